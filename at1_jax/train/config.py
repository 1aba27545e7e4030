"""Typed run configuration: dataclasses, loading from configs/*.py, command-line overrides.

A config file defines `get_config() -> TrainConfig`. Any field can be overridden with
`--config.SECTION.FIELD=VALUE` (e.g. `--config.optim.lr=1e-4`); `--config.model=at1`
swaps in a named model preset. Everything is validated before any compilation.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
import typing
from typing import Any

import tyro
from tyro import _errors as tyro_errors  # experimental parse-failure hook: tyro pinned exactly

from at1_io.constants import DEFAULT_ALLOWED_LICENSES, UNKNOWN_LICENSE
from at1_jax.model.denoiser import DenoiserConfig
from at1_jax.model.objective import ObjectiveConfig
from at1_jax.model.presets import PRESETS, get_preset
from at1_jax.model.samplers import SamplerConfig
from at1_jax.train.sharding import DEFAULT_RULES, GRAD_REDUCE, MESH_AXES

SCHEDULES = ("constant", "cosine")
# Logical axis -> mesh axis, several mesh axes, or None (replicated); see sharding.py.
MeshRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how batches are drawn from them."""

    path: str = ""  # dataset root (local or s3://) holding manifest.json
    batch_size: int = 32  # global, over all processes and micro-batches
    shuffle_shards: int = 4  # shards shuffled together (the shuffle buffer, in shards)
    streams: int = 0  # reading streams that define the data order; 0 = one per process
    prefetch: int = 2  # batches read ahead by the background thread
    text_array: str = ""  # "" = the manifest's first *_pooled array
    latent_scale: float = 0.0  # 0 = auto: 1/8 for VAE latents (the reference), 1 for pixels
    # Validation data: "" = the data set's own held-out split (val/); else another data set
    # root whose val/ split, or if it has none its training shards, is the validation set.
    val_path: str = ""
    # Licences the training split may carry, comma-separated (add "unknown" to train on data
    # without licence records); default: the data stage's default allow-list.
    licenses: str = ",".join(DEFAULT_ALLOWED_LICENSES)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up, optional cosine decay, clipping, accumulation and EMA."""

    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # 0 reproduces the references' Adam
    warmup_steps: int = 1000
    schedule: str = "constant"
    final_lr_ratio: float = 0.1  # cosine ends at lr·ratio
    clip_norm: float = 0.0  # 0 = no clipping (the references)
    grad_accum: int = 1  # micro-batches per step
    ema_decay: float = 0.999


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (-1: the rest of the devices) and the logical-axis rules."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: MeshRules = DEFAULT_RULES
    # Parameters of at most this many MiB stay whole on every fsdp device (big_vision's
    # min_size_to_shard_mb): in the at1 step on 2 processes x 2 CPU devices, gathering its
    # 3-4 MiB matrices and 2 KiB vectors every step made it 1.30x 1 x 4's time; 1.19x without.
    min_fsdp_mib: float = 4.0
    # How the step sums gradients over the batch axes. "xla": one all-reduce per gradient
    # array where the SPMD partitioner places it. "flat": gradients computed per device
    # (shard_map) and summed as one flat buffer; needs every parameter replicated. "auto":
    # flat on CPU across processes, where gloo sums a tuple one array at a time, a TCP ring
    # each (tld-tiny's 65 arrays: 80-94 ms, one flat buffer: 8 ms), xla elsewhere.
    grad_reduce: str = "auto"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints: local folder or s3://bucket/prefix."""

    dir: str = ""  # "" = {run_dir}/checkpoints
    every: int = 1000
    keep: int = 3
    async_save: bool = True
    resume: bool = True
    init_from: str = ""  # a checkpoint folder, or an at1-jax weights folder (convert output)
    retry_seconds: float = 120.0  # S3 checkpoint requests retry this long, then the run fails


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Progress bar, TensorBoard, optional W&B, sample grids."""

    every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "at1-jax"
    sample_every: int = 0  # 0 = no sample grids
    sample_steps: int = 40
    # The same defaults as `sample` and `serve`: a grid image is `sample --seed S` remade.
    sample_guidance: float = SamplerConfig.guidance
    sample_seed: int = SamplerConfig.seed
    num_samples: int = 8
    vae: str = ""  # "" = the dataset manifest's VAE; "none" = latent previews only
    val_every: int = 1000  # validation loss every N steps and at the end; 0 = never
    val_samples: int = 256  # the first N samples of the validation split (fixed subset)
    val_bins: int = 5  # noise levels: the centres of N equal bins of sigma in (0, 1)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How processes find each other (see launch/); auto-detected when left empty."""

    coordinator: str = ""  # host:port of process 0
    num_processes: int = 0
    process_id: int = -1
    initialize: str = "auto"  # auto (env: SLURM/K8s/launcher vars), always, never


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    name: str = "run"
    run_dir: str = "runs/run"
    seed: int = 0
    steps: int = 1000
    model: DenoiserConfig = PRESETS["tld-tiny"]
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    distributed: DistributedConfig = DistributedConfig()

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")


class ConfigError(ValueError):
    """A config file, override or value that cannot be used."""


def allowed_licenses(text: str) -> frozenset[str]:
    """The licence ids of a `data.licenses` value (comma-separated, case-insensitive)."""
    return frozenset(p.strip().lower() for p in text.split(",") if p.strip())


def load_file(path: str) -> TrainConfig:
    """Call `get_config()` from a Python config file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_at1_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} must define get_config() -> TrainConfig")
    cfg = module.get_config()
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not TrainConfig")
    return cfg


def _bool_from_text(args: list[str]) -> bool:
    text = args[0].lower()
    if text not in ("true", "false"):
        raise ValueError("expected true or false")
    return text == "true"


def _rules_from_text(args: list[str]) -> MeshRules:
    try:
        return _tuples(ast.literal_eval(args[0]))
    except (ValueError, SyntaxError):
        example = '[["batch", ["data", "fsdp"]], ["embed", "fsdp"]]'
        raise ValueError(f"expected a JSON or Python literal like {example}") from None


# tyro parses the overrides (typed CLIs over dataclasses, seeded with a default instance): it
# resolves the string annotations of `from __future__ import annotations`, rebuilds the frozen
# sections so their __post_init__ checks run on the combined values, and converts Optional,
# unions and tuples. ml_collections' config_flags assigns with setattr (frozen dataclasses
# fail) and reads unresolved string annotations; draccus has no default instance and decodes
# `str | tuple[str, ...]` from a list by trying str first. Two rules keep the project's
# syntax: booleans in any case (tyro's own are True/False) and the rules tuple as a literal.
_REGISTRY = tyro.constructors.ConstructorRegistry()


@_REGISTRY.primitive_rule
def _project_rules(info: tyro.constructors.PrimitiveTypeInfo):
    if info.type is bool:
        return tyro.constructors.PrimitiveConstructorSpec(
            nargs=1,
            metavar="{true,false}",
            instance_from_str=_bool_from_text,
            is_instance=lambda x: isinstance(x, bool),
            str_from_instance=lambda x: [str(x).lower()],
        )
    if info.type == MeshRules:
        return tyro.constructors.PrimitiveConstructorSpec(
            nargs=1,
            metavar="RULES",
            instance_from_str=_rules_from_text,
            is_instance=lambda x: isinstance(x, tuple),
            str_from_instance=lambda x: [json.dumps(x)],
        )
    return None


@dataclasses.dataclass(frozen=True)
class _CommandLine:
    """The `--config.…` namespace that tyro parses."""

    config: TrainConfig


def _flag_key(token: str) -> str:
    """`config.a.b` from `--config.a-b=…`: tyro accepts - and _ alike."""
    return token.lstrip("-").partition("=")[0].replace("-", "_")


def _not_a_field(cfg: TrainConfig, token: str) -> str:
    """Why tyro did not recognise `token`: an unknown name, or a whole section."""
    obj, parts = cfg, _flag_key(token).split(".")[1:]
    for i, name in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        if name not in names:
            where = ".".join(["config", *parts[:i]])
            if not names:
                return f"{token}: {where} has no sub-fields"
            return f"{token}: unknown field {name!r} in {where} (known: {', '.join(names)})"
        obj = getattr(obj, name)
    if dataclasses.is_dataclass(obj):
        return f"{token}: set the fields of section {parts[-1]!r} one by one"
    return f"{token}: not recognised as a config field"


def _parse_error(cfg: TrainConfig, args: list[str], event) -> None:
    """tyro's parse-failure hook: raise a one-line ConfigError naming flag, value and want."""
    if isinstance(event, tyro_errors.UnrecognizedArgs):
        raise ConfigError("; ".join(_not_a_field(cfg, t) for t in event.tokens))
    argument = getattr(event, "argument", None)
    reason = event.message if isinstance(event, tyro_errors.InstantiationFailure) else ""
    if isinstance(event, tyro_errors.InvalidChoice):
        reason = f"expected one of {', '.join(event.choices)}"
    reason = " ".join(reason.split())
    if not reason:
        raise ConfigError(f"{' '.join(args)}: rejected by tyro ({type(event).__name__})")
    if argument is None:  # a section's own __post_init__ check, which names the field
        raise ConfigError(reason)
    key = _flag_key(argument.display_name())
    token = ([a for a in args if _flag_key(a) == key] or [argument.display_name()])[-1]
    text = token.partition("=")[2]
    typ = argument.field.type_stripped
    name = typ.__name__ if isinstance(typ, type) else str(typ)
    raise ConfigError(f"{token}: cannot parse {text!r} as {name}: {reason}")


def _parse(cfg: TrainConfig, args: list[str]) -> TrainConfig:
    if not args:
        return cfg
    with tyro_errors.on_parse_error(lambda event: _parse_error(cfg, args, event)):
        try:
            return tyro.cli(
                _CommandLine,
                default=_CommandLine(cfg),
                args=args,
                prog="--config",
                add_help=False,
                use_underscores=True,
                config=(tyro.conf.FlagConversionOff,),
                registry=_REGISTRY,
            ).config
        except SystemExit as e:  # a failure tyro reported on stderr without calling the hook
            raise ConfigError(f"overrides {args} rejected (see the message above)") from e


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `--config.a.b=value` (or `config.a.b=value`) strings; a later one wins."""
    pending: list[str] = []
    for item in overrides:
        key, sep, text = item.lstrip("-").partition("=")
        if not sep or not key.startswith("config."):
            raise ConfigError(f"override {item!r} must look like --config.section.field=value")
        if key == "config.model":  # a preset replaces the whole model, in command-line order
            try:
                model = get_preset(text)
            except ValueError as e:
                raise ConfigError(f"--{key}={text}: {e}") from None
            cfg = dataclasses.replace(_parse(cfg, pending), model=model)
            pending = []
        else:
            pending.append(f"--{key}={text}")
    return _parse(cfg, pending)


def validate(cfg: TrainConfig) -> None:
    """Every value checked before compiling anything; messages name field and value."""

    def need(ok: bool, field: str, want: str):
        if not ok:
            value = cfg
            for part in field.split("."):
                value = getattr(value, part)
            raise ConfigError(f"config.{field} must be {want}, got {value!r}")

    # inf passes every range check below (inf > 0) and nan fails them with a puzzling text.
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        for f in dataclasses.fields(value) if dataclasses.is_dataclass(value) else ():
            number = getattr(value, f.name)
            if isinstance(number, float):
                need(math.isfinite(number), f"{section.name}.{f.name}", "a finite number")
    need(cfg.steps >= 1, "steps", ">= 1")
    need(bool(cfg.data.path), "data.path", "a dataset folder or s3:// URL with manifest.json")
    need(cfg.data.batch_size >= 1, "data.batch_size", ">= 1")
    need(cfg.data.shuffle_shards >= 1, "data.shuffle_shards", ">= 1")
    need(cfg.data.prefetch >= 1, "data.prefetch", ">= 1")
    need(cfg.data.streams >= 0, "data.streams", ">= 0 (0 = one per process)")
    need(cfg.data.latent_scale >= 0, "data.latent_scale", ">= 0 (0 = auto)")
    need(
        bool(allowed_licenses(cfg.data.licenses)),
        "data.licenses",
        f"comma-separated licence ids (e.g. {','.join(DEFAULT_ALLOWED_LICENSES)}; add "
        f"{UNKNOWN_LICENSE} for data without licence records)",
    )
    o = cfg.optim
    need(o.lr > 0, "optim.lr", "> 0")
    need(0 <= o.b1 < 1, "optim.b1", "in [0, 1)")
    need(0 <= o.b2 < 1, "optim.b2", "in [0, 1)")
    need(o.weight_decay >= 0, "optim.weight_decay", ">= 0")
    need(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0")
    need(o.schedule in SCHEDULES, "optim.schedule", f"one of {SCHEDULES}")
    need(0 <= o.final_lr_ratio <= 1, "optim.final_lr_ratio", "in [0, 1]")
    need(o.clip_norm >= 0, "optim.clip_norm", ">= 0 (0 = off)")
    need(o.grad_accum >= 1, "optim.grad_accum", ">= 1")
    need(
        cfg.data.batch_size % o.grad_accum == 0, "data.batch_size", "a multiple of optim.grad_accum"
    )
    need(0 <= o.ema_decay < 1, "optim.ema_decay", "in [0, 1)")
    need(cfg.checkpoint.every >= 1, "checkpoint.every", ">= 1")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", ">= 1")
    need(cfg.checkpoint.retry_seconds > 0, "checkpoint.retry_seconds", "> 0 (seconds)")
    need(cfg.log.every >= 1, "log.every", ">= 1")
    need(cfg.log.sample_every >= 0, "log.sample_every", ">= 0")
    need(cfg.log.num_samples >= 1, "log.num_samples", ">= 1")
    need(cfg.log.val_every >= 0, "log.val_every", ">= 0 (0 = no validation loss)")
    need(cfg.log.val_samples >= 1, "log.val_samples", ">= 1")
    need(cfg.log.val_bins >= 1, "log.val_bins", ">= 1")
    need(
        cfg.distributed.initialize in ("auto", "always", "never"),
        "distributed.initialize",
        "auto, always or never",
    )
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, axis)
        need(size == -1 or size >= 1, f"mesh.{axis}", ">= 1 or -1")
    need(cfg.mesh.min_fsdp_mib >= 0, "mesh.min_fsdp_mib", ">= 0 (0: split every parameter)")
    need(cfg.mesh.grad_reduce in GRAD_REDUCE, "mesh.grad_reduce", " or ".join(GRAD_REDUCE))

    def mesh_axes(target) -> bool:
        names = target if isinstance(target, tuple) else (target,)
        return target is None or all(isinstance(a, str) and a in MESH_AXES for a in names)

    need(
        all(
            isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) and mesh_axes(r[1])
            for r in cfg.mesh.rules
        ),
        "mesh.rules",
        f"(logical axis, mesh axis or tuple of them or None) pairs over {MESH_AXES}",
    )


def to_json(cfg: TrainConfig) -> str:
    """The resolved config as JSON (it holds no secrets: those come only from the env)."""
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig saved by `to_json`."""

    def build(cls, raw):
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            if dataclasses.is_dataclass(hints[f.name]):
                value = build(hints[f.name], value)
            elif isinstance(value, list):
                value = _tuples(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    return build(TrainConfig, d)
