"""Train the denoiser: `python -m at1_jax.train --config configs/cpu.py [--config.a.b=v …]`.

Every process of a multi-host run executes this same command (see launch/).
Exit codes: 0 done (or stopped by a signal after its checkpoint); 1 an outside failure
(storage unreachable, disk full: fix it and rerun to resume); 2 a config, data set or
checkpoint that cannot be used; 3 a non-finite step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import jax
import numpy as np

from at1_io import schema
from at1_jax.checkpointing import checkpoints as checkpoint
from at1_jax.model.flops import analytic_train_flops
from at1_jax.train import config, data, distributed, host_memory, reporting, sharding, validation
from at1_jax.train import step as train_step
from at1_jax.train.export import WEIGHTS_DIR, RunFailure, export_ema, exported_step
from at1_jax.train.reporting import Reporter, say
from at1_jax.train.run_record import (
    config_changes,
    layout_changes,
    newest_meta,
    refuse_changes_to_finished,
    write_config,
)
from at1_jax.train.run_setup import (
    check_fit,
    dry_run_report,
    fit_to_dataset,
    initial_model,
    param_count,
    parent_of,
    parse_args,
    resolve_numerics,
    validation_set,
)
from at1_jax.train.sample_grids import SampleGrids, write_grid

log = logging.getLogger(__name__)

EXIT_FAILED, EXIT_UNUSABLE, EXIT_NONFINITE = 1, 2, 3


class TrainingError(RuntimeError):
    """A non-finite step: the run cannot go on; the message says why and what to do."""


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
    cfg = resolve_numerics(fit_to_dataset(cfg, ds, pinned))
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
                say(f"already finished at step {latest}: nothing to do; EMA weights in {out}")
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
            say(f"settings changed since step {latest}: {'; '.join(changes)}")
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
    if train_step.grad_reduce(cfg, spec) == "flat":
        how = cfg.mesh.grad_reduce
        log.info("gradients: one flat all-reduce per step (mesh.grad_reduce=%s)", how)
    if latest is not None:
        say(f"resuming from step {start} of {cfg.steps} ({where})")
    say(f"compiling the train step ({param_count(cfg.model):,} parameters)…")
    step_fn = host_memory.compile_step(jitted, spec.abstract, first)
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
    say(f"already finished at step {step}; its EMA weights were exported to {out}")
    return 0


def _stopped_early(latest: int | None) -> int:
    kept = f"the latest checkpoint is step {latest}" if latest is not None else "no checkpoint"
    say(f"stop signal before the first step: nothing to save ({kept}), exiting")
    return 0


class _NoBackgroundTracebacks(logging.Filter):
    """Orbax threads and event loops log exceptions with tracebacks; the error line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


_NO_TRACEBACKS = _NoBackgroundTracebacks()


def quiet_library_tracebacks() -> None:
    """Orbax's and asyncio's loggers keep their messages but drop tracebacks."""
    # asyncio too: a failed async save can leave tasks that asyncio.run() logs at shutdown.
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_NO_TRACEBACKS)


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
