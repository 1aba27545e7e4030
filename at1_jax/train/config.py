"""Typed run configuration: dataclasses, loading from configs/*.py, command-line overrides.

A config file defines `get_config() -> TrainConfig`. Any field can be overridden with
`--config.SECTION.FIELD=VALUE` (e.g. `--config.optim.lr=1e-4`); `--config.model=at1`
swaps in a named model preset. Everything is validated before any compilation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import types
import typing
from typing import Any

from at1_jax.model.denoiser import DenoiserConfig
from at1_jax.model.objective import ObjectiveConfig
from at1_jax.model.presets import PRESETS
from at1_jax.train.sharding import DEFAULT_RULES

SCHEDULES = ("constant", "cosine")


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
    rules: tuple = DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints: local folder or s3://bucket/prefix."""

    dir: str = ""  # "" = {run_dir}/checkpoints
    every: int = 1000
    keep: int = 3
    async_save: bool = True
    resume: bool = True
    init_from: str = ""  # a checkpoint folder, or an at1-jax weights folder (convert output)


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Progress bar, TensorBoard, optional W&B, sample grids."""

    every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "at1-jax"
    sample_every: int = 0  # 0 = no sample grids
    sample_steps: int = 40
    sample_guidance: float = 4.5
    num_samples: int = 8
    vae: str = ""  # "" = the dataset manifest's VAE; "none" = latent previews only


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


def _parse_scalar(text: str, typ, where: str):
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_scalar(text, args[0], where)
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typ is str:
            return text
        if typ is tuple or origin is tuple:
            return _tuples(json.loads(text))
    except (ValueError, TypeError, json.JSONDecodeError):
        name = getattr(typ, "__name__", typ)
        raise ConfigError(f"{where}: cannot parse {text!r} as {name}") from None
    raise ConfigError(f"{where}: fields of type {typ} cannot be set from the command line")


def _override(obj, path: list[str], text: str, where: str):
    name, rest = path[0], path[1:]
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        raise ConfigError(f"{where}: unknown field {name!r} (known: {', '.join(fields)})")
    typ = typing.get_type_hints(type(obj))[name]
    current = getattr(obj, name)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{where}: {name!r} has no sub-fields")
        value = _override(current, rest, text, where)
    elif dataclasses.is_dataclass(typ) and typ is DenoiserConfig:
        if text not in PRESETS:
            raise ConfigError(f"{where}: unknown model preset {text!r}; known: {sorted(PRESETS)}")
        value = PRESETS[text]
    elif dataclasses.is_dataclass(current):
        raise ConfigError(f"{where}: set the fields of section {name!r} one by one")
    else:
        value = _parse_scalar(text, typ, where)
    try:
        return dataclasses.replace(obj, **{name: value})
    except ValueError as e:  # a section's own __post_init__ check
        raise ConfigError(f"{where}: {e}") from e


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `--config.a.b=value` (or `config.a.b=value`) strings in order."""
    for item in overrides:
        key, sep, text = item.lstrip("-").partition("=")
        if not sep or not key.startswith("config."):
            raise ConfigError(f"override {item!r} must look like --config.section.field=value")
        cfg = _override(cfg, key.split(".")[1:], text, f"--{key}")
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Every value checked before compiling anything; messages name field and value."""

    def need(ok: bool, field: str, want: str):
        if not ok:
            value = cfg
            for part in field.split("."):
                value = getattr(value, part)
            raise ConfigError(f"config.{field} must be {want}, got {value!r}")

    need(cfg.steps >= 1, "steps", ">= 1")
    need(bool(cfg.data.path), "data.path", "a dataset folder or s3:// URL with manifest.json")
    need(cfg.data.batch_size >= 1, "data.batch_size", ">= 1")
    need(cfg.data.shuffle_shards >= 1, "data.shuffle_shards", ">= 1")
    need(cfg.data.prefetch >= 1, "data.prefetch", ">= 1")
    need(cfg.data.streams >= 0, "data.streams", ">= 0 (0 = one per process)")
    need(cfg.data.latent_scale >= 0, "data.latent_scale", ">= 0 (0 = auto)")
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
    need(cfg.log.every >= 1, "log.every", ">= 1")
    need(cfg.log.sample_every >= 0, "log.sample_every", ">= 0")
    need(cfg.log.num_samples >= 1, "log.num_samples", ">= 1")
    need(
        cfg.distributed.initialize in ("auto", "always", "never"),
        "distributed.initialize",
        "auto, always or never",
    )
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, axis)
        need(size == -1 or size >= 1, f"mesh.{axis}", ">= 1 or -1")


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
