"""Run set-up: the command line, model sizes fitted to the data set, start weights, --dry-run."""

from __future__ import annotations

import argparse
import dataclasses
import logging

import jax
from flax import nnx

from at1_jax.checkpointing import model_card
from at1_jax.checkpointing.load import MissingFiles, card_of, load_model
from at1_jax.model import depthwise_native
from at1_jax.model.denoiser import DEPTHWISE, DTYPES, NUMERICS, Denoiser, count_params
from at1_jax.model.depthwise import auto_impl
from at1_jax.model.hardware import auto_dtype_reason
from at1_jax.model.presets import PRESETS
from at1_jax.train import config, data, distributed, validation
from at1_jax.train.reporting import say

log = logging.getLogger(__name__)

# The first line of `python -m at1_jax.train --help`.
DESCRIPTION = (
    "Train the denoiser: `python -m at1_jax.train --config configs/cpu.py [--config.a.b=v …]`."
)
# Model sizes that follow the data set unless given on the command line.
SIZE_FIELDS = ("latent_channels", "latent_size", "text_dim")


def _epilog() -> str:
    groups = ", ".join(f.name for f in dataclasses.fields(config.TrainConfig))
    return (
        "Any config field is set with --config.SECTION.FIELD=VALUE, e.g.\n"
        "  --config.optim.lr=1e-4 --config.data.path=s3://bucket/data\n"
        f"Sections and fields: {groups}\n"
        f"Model presets (--config.model=NAME): {', '.join(PRESETS)}\n"
        "--dry-run shows the resolved config without training."
    )


def parse_args(argv) -> tuple[config.TrainConfig, frozenset[str], bool]:
    """The run's config, the model sizes pinned on the command line, and --dry-run."""
    p = argparse.ArgumentParser(
        prog="python -m at1_jax.train",
        description=DESCRIPTION,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
    p.add_argument("--init-from", help="checkpoint folder or at1-jax weights folder to start from")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the data set's summary, then exit (no compiling)",
    )
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        p.error(f"unknown arguments {unknown}; fields are set as --config.section.field=value")
    cfg = config.apply_overrides(config.load_file(args.config), rest)
    ck = cfg.checkpoint
    if args.init_from is not None:
        ck = dataclasses.replace(ck, init_from=args.init_from)
    if args.resume is not None:
        ck = dataclasses.replace(ck, resume=args.resume)
    return dataclasses.replace(cfg, checkpoint=ck), pinned_sizes(rest), args.dry_run


def pinned_sizes(overrides: list[str]) -> frozenset[str]:
    """`SIZE_FIELDS` set by `--config.model.X=` (a later `--config.model=PRESET` unsets them)."""
    pinned: set[str] = set()
    for item in overrides:
        key = item.lstrip("-").partition("=")[0].replace("-", "_")
        if key == "config.model":
            pinned.clear()
        elif key.startswith("config.model.") and key.rsplit(".", 1)[1] in SIZE_FIELDS:
            pinned.add(key.rsplit(".", 1)[1])
    return frozenset(pinned)


def fit_to_dataset(
    cfg: config.TrainConfig, ds: data.Dataset, pinned: frozenset[str] = frozenset()
) -> config.TrainConfig:
    """The config with the data set's latent and text sizes; a pinned size must agree."""
    shape = tuple(ds.latent_shape)
    facts = f"data set {ds.root} (latents {shape}, text array {ds.text_name!r} {ds.text_dim}-d)"
    if len(shape) != 3 or shape[1] != shape[2]:
        raise config.ConfigError(f"{facts}: the model needs (channels, size, size) latents")
    found = {"latent_channels": shape[0], "latent_size": shape[1], "text_dim": ds.text_dim}
    clash = [
        f"--config.model.{k}={getattr(cfg.model, k)} (data set: {v})"
        for k, v in found.items()
        if k in pinned and getattr(cfg.model, k) != v
    ]
    if clash:
        raise config.ConfigError(
            f"{', '.join(clash)} given on the command line does not fit the {facts}: drop "
            "the override to take the data set's size, or use another data set"
        )
    changed = {k: v for k, v in found.items() if getattr(cfg.model, k) != v}
    if not changed:
        return cfg
    try:
        model = dataclasses.replace(cfg.model, **changed)
    except ValueError as e:
        raise config.ConfigError(f"{facts}: {e}") from None
    log.info(
        "model sizes from the data set: %s",
        ", ".join(f"{k}={v} (config: {getattr(cfg.model, k)})" for k, v in changed.items()),
    )
    return dataclasses.replace(cfg, model=model)


def resolve_numerics(cfg: config.TrainConfig) -> config.TrainConfig:
    """The config with model.dtype "auto" resolved; both "auto"s must mean the same everywhere."""
    dtype_auto, depthwise_auto = cfg.model.dtype == "auto", cfg.model.depthwise == "auto"
    reason = depthwise_native.unavailable_reason() if cfg.model.depthwise == "native" else None
    if reason:  # refused here, with the reason, rather than inside the step's compilation
        raise config.ConfigError(
            f"config.model.depthwise='native': {reason}: pass --config.model.depthwise=auto"
        )
    if not (dtype_auto or depthwise_auto):
        return cfg
    dtype, why = auto_dtype_reason() if dtype_auto else (cfg.model.dtype, "")
    impl = auto_impl() if depthwise_auto else cfg.model.depthwise
    # One SPMD program for all processes: hosts that resolve differently must not mix them.
    rows = distributed.allgather_rows([DTYPES.index(dtype), DEPTHWISE.index(impl)])
    dtypes, impls = ({row[i] for row in rows} for i in (0, 1))
    if len(dtypes) > 1:
        found = " on some hosts, ".join(DTYPES[c] for c in sorted(dtypes))
        raise config.ConfigError(
            f"config.model.dtype='auto' means {found} on others (their hardware differs): "
            "pass --config.model.dtype=float32 or bfloat16"
        )
    if len(impls) > 1:
        found = " on some hosts, ".join(DEPTHWISE[c] for c in sorted(impls))
        raise config.ConfigError(
            f"config.model.depthwise='auto' means {found} on others (the C++ kernel did not "
            "build everywhere; see the warning above): pass --config.model.depthwise=shift"
        )
    if depthwise_auto:
        # Kept "auto" in the config: weights trained here stay loadable on a GPU.
        log.info("model.depthwise auto: %s", impl)
    if not dtype_auto:
        return cfg
    log.info("model.dtype auto: %s (%s)", dtype, why)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))


def check_fit(cfg: config.TrainConfig) -> None:
    """The batch splits over the processes; raised before anything is compiled."""
    if cfg.data.batch_size % jax.process_count():
        raise config.ConfigError(
            f"config.data.batch_size={cfg.data.batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )


def validation_set(cfg: config.TrainConfig, ds: data.Dataset):
    """The held-out samples the validation loss uses, or None (off, or no split)."""
    if not cfg.log.val_every:
        return None
    found = validation.find_split(ds, cfg.data.val_path)
    if found is None:
        say(
            f"no validation split in {ds.root} (data_prep.encode --val-fraction or "
            "--val-input writes one; data.val_path names another data set): no validation loss"
        )
        return None
    return validation.load_split(*found, cfg.log.val_samples)


def initial_model(cfg: config.TrainConfig):
    """Weights to fine-tune from (`init_from`), or None to start from the seed."""
    path = cfg.checkpoint.init_from
    if not path:
        return None
    try:  # stored weights, this run's numerics (compute dtype, remat, …)
        model, _ = load_model(path, **{k: getattr(cfg.model, k) for k in NUMERICS})
    except (MissingFiles, ValueError, OSError) as e:
        raise config.ConfigError(f"config.checkpoint.init_from: {e}") from e
    if model.cfg.architecture() != cfg.model.architecture():
        raise config.ConfigError(
            f"init_from {path}: its model {model.cfg} differs from config.model {cfg.model}"
        )
    return model


def parent_of(cfg: config.TrainConfig) -> dict | None:
    """What a fine-tune records of the weights it starts from (`init_from`) and their card."""
    path = cfg.checkpoint.init_from
    if not path:
        return None
    try:
        return model_card.parent_record(path, card_of(path))
    except (MissingFiles, model_card.CardError, ValueError) as e:
        raise config.ConfigError(f"config.checkpoint.init_from: {e}") from e


def dry_run_report(cfg: config.TrainConfig, pinned: frozenset[str]) -> int:
    """Prints the config as it would train (sizes fitted to the data set) and the data set."""
    ds = data.open_dataset(cfg.data.path, cfg.data.text_array, cfg.data.latent_scale)
    cfg = resolve_numerics(fit_to_dataset(cfg, ds, pinned))
    check_fit(cfg)
    licenses = data.check_licenses(ds, config.allowed_licenses(cfg.data.licenses))
    m = ds.manifest
    print(config.to_json(cfg))
    print(
        f"data set {ds.root}: {m.num_samples} training samples in {len(m.shards)} shards, "
        f"{m.val_num_samples} held out; latents {tuple(ds.latent_shape)} × "
        f"{ds.latent_scale:g}, text {ds.text_name} ({ds.text_dim}-d); training-split "
        f"licences {licenses} (allowed: {cfg.data.licenses})"
    )
    epochs = cfg.steps * cfg.data.batch_size / max(m.num_samples, 1)
    print(
        f"model: {param_count(cfg.model):,} parameters; {cfg.steps} steps of "
        f"{cfg.data.batch_size} images = {epochs:.1f} epochs"
    )
    return 0


def param_count(model_cfg) -> int:
    """Trainable parameters of a model config (shapes only, nothing allocated)."""
    return count_params(nnx.eval_shape(lambda: Denoiser(model_cfg, nnx.Rngs(0))))
