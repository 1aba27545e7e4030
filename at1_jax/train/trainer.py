"""Train the denoiser: `python -m at1_jax.train --config configs/cpu.py [--config.a.b=v …]`.

Every process of a multi-host run executes this same command (see launch/).
Exit codes: 0 done (or stopped by a signal after its checkpoint); 1 an outside failure
(storage unreachable, disk full: fix it and rerun to resume); 2 a config, data set or
checkpoint that cannot be used; 3 a non-finite step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from at1_io import schema
from at1_jax.checkpointing import checkpoints as checkpoint
from at1_jax.checkpointing import model_card
from at1_jax.checkpointing.load import MissingFiles, card_of, load_model
from at1_jax.model.denoiser import NUMERICS, Denoiser, count_params
from at1_jax.model.flops import analytic_train_flops
from at1_jax.model.presets import PRESETS
from at1_jax.train import config, data, distributed, reporting, sharding, validation
from at1_jax.train import step as train_step
from at1_jax.train.export import WEIGHTS_DIR, RunFailure, export_ema, exported_step
from at1_jax.train.reporting import Reporter
from at1_jax.train.run_record import (
    config_changes,
    layout_changes,
    newest_meta,
    refuse_changes_to_finished,
    write_config,
)
from at1_jax.train.sample_grids import SampleGrids, write_grid

log = logging.getLogger(__name__)

EXIT_FAILED, EXIT_UNUSABLE, EXIT_NONFINITE = 1, 2, 3
# Model sizes that follow the data set unless given on the command line.
SIZE_FIELDS = ("latent_channels", "latent_size", "text_dim")


class TrainingError(RuntimeError):
    """A non-finite step: the run cannot go on; the message says why and what to do."""


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
        description=__doc__.split("\n")[0],
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
        _say(
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
    cfg = fit_to_dataset(cfg, ds, pinned)
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


def _say(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


def _close_all(closers: list, failing: bool) -> None:
    """Run every closer; while an error is on its way out, theirs are warnings, never masks."""
    first = None
    for name, close in reversed(closers):
        try:
            close()
        except Exception as e:
            if failing or first is not None:
                log.warning("%s also failed while stopping: %s: %s", name, type(e).__name__, e)
            else:
                first = e
    if first is not None:
        raise first


def train(
    cfg: config.TrainConfig,
    pinned: frozenset[str] = frozenset(),
    stop: distributed.StopSignal | None = None,
) -> int:
    """The training run; returns 0 or raises an error that `main` turns into an exit code."""
    own_stop = stop is None
    stop = stop or distributed.StopSignal()
    closers, failing = [], True
    try:
        code = _train(cfg, pinned, stop, closers)
        failing = False
        return code
    finally:
        if own_stop:
            closers.insert(0, ("the signal handlers", stop.restore))
        _close_all(closers, failing)


def _train(cfg, pinned, stop, closers) -> int:
    config.validate(cfg)
    reporting.check_backends(cfg)
    ds = data.open_dataset(cfg.data.path, cfg.data.text_array, cfg.data.latent_scale)
    cfg = fit_to_dataset(cfg, ds, pinned)
    check_fit(cfg)
    licenses = data.check_licenses(ds, config.allowed_licenses(cfg.data.licenses))
    vset = validation_set(cfg, ds)
    try:
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise config.ConfigError(f"config.{e}") from e
    dp = sharding.data_parallel_size(mesh, cfg.mesh.rules)
    if cfg.data.batch_size % (dp * cfg.optim.grad_accum):
        raise config.ConfigError(
            f"config.data.batch_size={cfg.data.batch_size} must be a multiple of the "
            f"data-parallel size {dp} × optim.grad_accum {cfg.optim.grad_accum}"
        )
    streams = cfg.data.streams or jax.process_count()
    if cfg.data.batch_size % streams:
        raise config.ConfigError(
            f"config.data.batch_size={cfg.data.batch_size} is not divisible by the {streams} "
            "reading streams (data.streams, default one per process)"
        )
    hosted = data.local_streams(
        ds, streams, cfg.seed, cfg.data.shuffle_shards, jax.process_index(), jax.process_count()
    )
    primary = jax.process_index() == 0
    tx = train_step.make_optimizer(cfg.optim, cfg.steps)
    spec = train_step.state_spec(cfg, tx, mesh)
    ckpts = checkpoint.Checkpoints(
        cfg.checkpoint_dir,
        cfg.checkpoint.keep,
        cfg.checkpoint.async_save,
        retry_seconds=cfg.checkpoint.retry_seconds,
    )
    closers.append(("closing the checkpoints", ckpts.close))
    where = cfg.checkpoint_dir
    latest = ckpts.latest_step()
    if latest is not None and not cfg.checkpoint.resume:
        raise config.ConfigError(
            f"{where} already holds the checkpoints of a run (steps {ckpts.steps()}) and "
            "resume is off (--no-resume): a new run there would collide with them. Train it "
            f"in a new run_dir (or checkpoint.dir), or delete {where} to start over there"
        )
    positions = [[0, 0, 0]] * streams
    if latest is not None:
        latest, recorded = newest_meta(ckpts)
        saved = recorded.get("config") or {}
        layout = layout_changes(saved, cfg) if saved else []
        if layout:
            raise config.ConfigError(
                f"cannot resume from step {latest} in {where}: its train state was made by "
                f"another config ({'; '.join(layout)}). Resuming needs the same model "
                "architecture and clipping on/off: train this config in a new run_dir (or "
                f"checkpoint.dir), or delete {where} to start over there"
            )
        changes = config_changes(saved, cfg) if saved else []
        if latest >= cfg.steps:
            refuse_changes_to_finished(cfg, latest, changes)
            if exported_step(cfg.run_dir) == latest:
                out = os.path.join(cfg.run_dir, WEIGHTS_DIR)
                _say(f"already finished at step {latest}: nothing to do; EMA weights in {out}")
                return 0
    if not stop.multi and stop.requested_here:  # one process: no agreement needed
        return _stopped_early(latest)
    if latest is not None:
        # The newest step whose arrays match their checksums (a corrupt one is skipped with
        # a warning naming it); it is `latest` unless that one is damaged.
        latest, state, meta = ckpts.restore_latest(spec.abstract)
        if latest >= cfg.steps:
            return _export_finished(cfg, state, latest, meta)
        if changes:
            _say(f"settings changed since step {latest}: {'; '.join(changes)}")
        saved_positions = meta.get("data_positions") or positions
        if len(saved_positions) == streams:
            positions = saved_positions
        else:
            epoch = max(p[0] for p in saved_positions) + 1
            log.warning(
                "checkpoint has %d data streams, this run %d: data order restarts at epoch %d",
                len(saved_positions),
                streams,
                epoch,
            )
            positions = [[epoch, 0, 0]] * streams
        start = int(meta["step"])
        # Checkpoints written before provenance counting hold none: counted from here on.
        consumed_before = data.Consumed.from_dict(meta.get("consumed"))
        counted_from = meta.get("consumed_from_step", 0 if "consumed" in meta else start)
        parent, last_val = meta.get("parent"), meta.get("validation")
    else:
        state = train_step.init_state(cfg, tx, spec, initial_model(cfg))
        start, consumed_before, counted_from = 0, data.Consumed(), 0
        parent, last_val = parent_of(cfg), None
    if primary:  # the config this run trains with, from `start` on
        write_config(cfg)
    first_stream = hosted[0].index
    start_positions = [data.Position(*positions[first_stream + i]) for i in range(len(hosted))]
    reader = data.BatchReader(
        hosted, cfg.data.batch_size // streams, start_positions, cfg.data.prefetch
    )
    closers.append(("stopping the data reader", reader.close))
    first = train_step.global_batch(reader.next(), spec, cfg.data.batch_size)
    jitted = train_step.make_train_step(cfg, tx, spec, ds.latent_scale)
    if latest is not None:
        _say(f"resuming from step {start} of {cfg.steps} ({where})")
    _say(f"compiling the train step ({param_count(cfg.model):,} parameters)…")
    step_fn = jitted.lower(spec.abstract, first).compile()
    if stop.should_stop(start):
        return _stopped_early(latest)
    flops = analytic_train_flops(cfg.model) * cfg.data.batch_size  # model FLOPs, for MFU
    reporter = Reporter(cfg, start, flops, json.loads(config.to_json(cfg)))
    closers.append(("closing the logs", reporter.close))
    samples = SampleGrids(cfg, ds, spec.graphdef, mesh) if cfg.log.sample_every else None
    validator = None
    if vset is not None:
        validator = validation.Validator(
            vset,
            spec.graphdef,
            mesh,
            cfg.log.val_bins,
            cfg.data.batch_size // cfg.optim.grad_accum,  # the micro-batch: it fits
            cfg.mesh.rules,
            spec.shardings["params"],
            spec.shardings["buffers"],
        )
    meta_base = {
        "seed": cfg.seed,
        "config": json.loads(config.to_json(cfg)),
        "dataset": {
            "root": ds.root,
            "autoencoder": ds.manifest.autoencoder,
            "text_encoders": ds.manifest.text_encoders,
            "text_array": ds.text_name,
            "latent_scale": ds.latent_scale,
            "captioning": ds.manifest.captioning,
            "num_samples": ds.manifest.num_samples,
            "val_num_samples": ds.manifest.val_num_samples,
            "licenses": licenses,  # of the training split; "unknown" where unrecorded
            "sources": ds.manifest.totals(schema.TRAIN).sources,
        },
        "parent": parent,
        "consumed_from_step": counted_from,
    }
    last_meta: dict = {}
    saved_step = latest  # the latest save, started or done (None: no checkpoint yet)

    def save(step: int, data_positions: list[data.Position], taken: data.Consumed):
        nonlocal saved_step, last_meta
        flat = [v for p in data_positions for v in dataclasses.astuple(p)]
        rows = [r[i : i + 3] for r in distributed.allgather_rows(flat) for i in range(0, len(r), 3)]
        # Every process's samples since the start of this process, on top of the resumed ones.
        consumed = consumed_before.plus(data.gather_consumed(taken)).to_dict()
        last_meta = {
            **meta_base,
            "step": step,
            "data_positions": rows,
            "consumed": consumed,
            "validation": last_val,
        }
        ckpts.save(step, state, last_meta)
        saved_step = step
        reporter.provenance(step, consumed)
        reporter.plot()

    def validate(step: int) -> tuple[dict, float]:
        nonlocal last_val
        t0 = time.perf_counter()
        losses = validator.evaluate(state)
        last_val = {
            "step": step,
            "set": vset.describe(),
            "bins": validator.names,
            **losses,
        }
        return losses, time.perf_counter() - t0

    def check(step: int, metrics: dict) -> dict:
        host = jax.device_get(metrics)
        if bool(host["finite"]):
            return host
        values = f"loss={float(host['loss'])}, grad_norm={float(host['grad_norm'])}"
        if not (np.isfinite(host["loss"]) and np.isfinite(host["grad_norm"])):
            what = f"non-finite loss or gradient at step {step} ({values})"
        else:
            what = (
                f"the update of step {step} made the weights or optimizer state non-finite "
                f"({values}, lr={float(host['lr'])})"
            )
        kept = f"step {saved_step}" if saved_step is not None else "none yet"
        raise TrainingError(
            f"{what}; the state was not updated and nothing after it is saved (latest "
            f"checkpoint: {kept}). Lower optim.lr, set optim.clip_norm, or check the data."
        )

    batch, step = first, start
    pending = None  # (step, metrics) of the step whose metrics are not checked yet
    while step < cfg.steps:
        state, metrics = step_fn(state, batch)
        step += 1
        done_position, done_consumed = reader.positions, reader.consumed
        if pending is not None:
            reporter.step(pending[0], check(*pending))
        pending = (step, metrics)
        preempted = stop.should_stop(step)
        saving = step % cfg.checkpoint.every == 0 or step == cfg.steps or preempted
        validating = validator is not None and (step % cfg.log.val_every == 0 or step == cfg.steps)
        if saving or validating:
            host = check(step, metrics)  # a non-finite step is neither validated nor saved
            pending = None
            val, val_s = validate(step) if validating else (None, 0.0)
            reporter.step(step, host, val, val_s)
            if saving:
                save(step, done_position, done_consumed)
        if samples and (step % cfg.log.sample_every == 0 or step == cfg.steps):
            pages = samples.sheet(state, step)
            if primary:
                write_grid(cfg.run_dir, step, pages)
                reporter.image(step, pages[0])
        if preempted:
            ckpts.wait()  # the checkpoint the message speaks of is complete
            reporter.message(f"stop signal: checkpoint of step {step} saved, exiting")
            break
        if step < cfg.steps:
            batch = train_step.global_batch(reader.next(), spec, cfg.data.batch_size)
    if pending is not None:
        reporter.step(pending[0], check(*pending))
    ckpts.wait()  # raises a failed background save, naming its step
    if step == cfg.steps:
        out = export_ema(state, cfg, step, last_meta)
        reporter.message(f"done: {step} steps; EMA weights and model card in {out}")
        reporter.message(f"trained on {reporting.describe_consumed(last_meta['consumed'])}")
    if reader.skipped_shards:
        skipped = reader.skipped_shards
        log.warning("skipped %d corrupt shards: %s", len(skipped), skipped)
    return 0


def _export_finished(cfg, state: dict, step: int, meta: dict) -> int:
    """A finished run whose weights are missing or older: export them, never retrain."""
    out = export_ema(state, cfg, step, meta)
    _say(f"already finished at step {step}; its EMA weights were exported to {out}")
    return 0


def _stopped_early(latest: int | None) -> int:
    kept = f"the latest checkpoint is step {latest}" if latest is not None else "no checkpoint"
    _say(f"stop signal before the first step: nothing to save ({kept}), exiting")
    return 0


class _NoBackgroundTracebacks(logging.Filter):
    """Orbax threads and event loops log exceptions with tracebacks; the error line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


_QUIET_ABSL = _NoBackgroundTracebacks()


def quiet_library_tracebacks() -> None:
    """Orbax's and asyncio's loggers keep their messages but drop tracebacks."""
    # asyncio too: a failed async save can leave tasks that asyncio.run() logs at shutdown.
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_QUIET_ABSL)


def main(argv=None) -> int:
    stop = distributed.StopSignal()  # first: a signal during start-up stops cleanly
    # Usually a no-op: absl calls basicConfig() when orbax is imported. Either way the root
    # logger keeps WARNING (libraries stay quiet) and at1_jax's own INFO lines get through.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    quiet_library_tracebacks()
    try:
        cfg, pinned, dry_run = parse_args(argv)
        config.validate(cfg)
        if dry_run:
            return dry_run_report(cfg, pinned)
        distributed.initialize(cfg.distributed)
        stop.joined()
        if jax.process_index() == 0:
            logging.getLogger("at1_jax").setLevel(logging.INFO)
        t0 = time.perf_counter()
        code = train(cfg, pinned, stop)
        log.info("finished in %.1f s", time.perf_counter() - t0)
        return code
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    # Storage that stopped answering is worth a rerun later (1), unlike unusable input (2).
    except (data.StorageUnavailable, checkpoint.CheckpointStorageError, RunFailure, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (config.ConfigError, data.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    finally:
        stop.restore()
