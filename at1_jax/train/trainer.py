"""Train the denoiser: `python -m at1_jax.train --config configs/cpu.py [--config.a.b=v …]`.

Every process of a multi-host run executes this same command (see launch/).
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
from jax.experimental import multihost_utils

from at1_jax.checkpointing import checkpoints as checkpoint
from at1_jax.checkpointing.load import MissingFiles, load_model
from at1_jax.model import weights
from at1_jax.model.denoiser import NUMERICS
from at1_jax.model.flops import analytic_train_flops
from at1_jax.train import config, data, distributed, sharding
from at1_jax.train import step as train_step
from at1_jax.train.reporting import Reporter
from at1_jax.train.sample_grids import SampleGrids, write_grid

log = logging.getLogger("at1_jax.train")

EXIT_NONFINITE = 3


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def parse_args(argv) -> config.TrainConfig:
    p = argparse.ArgumentParser(prog="python -m at1_jax.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
    p.add_argument("--init-from", help="checkpoint folder or at1-jax weights folder to start from")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None)
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
    return dataclasses.replace(cfg, checkpoint=ck)


def check_fit(cfg: config.TrainConfig, ds: data.Dataset) -> None:
    """Model, dataset and devices agree; raised before anything is compiled."""
    m = cfg.model
    want = (m.latent_channels, m.latent_size, m.latent_size)
    if tuple(ds.latent_shape) != want:
        raise config.ConfigError(
            f"dataset {ds.root} has latents {tuple(ds.latent_shape)} but the model expects "
            f"(channels, size, size) = {want}: set config.model.latent_channels/latent_size"
        )
    if ds.text_dim != m.text_dim:
        raise config.ConfigError(
            f"dataset text array {ds.text_name!r} is {ds.text_dim}-d but config.model.text_dim "
            f"is {m.text_dim}"
        )
    if cfg.data.batch_size % jax.process_count():
        raise config.ConfigError(
            f"config.data.batch_size={cfg.data.batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )


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


def export_ema(state: dict, cfg: config.TrainConfig, directory: str, dataset: dict) -> None:
    """Write the EMA weights as an at1-jax weights folder (gathered to process 0)."""
    arrays = {"params": state["ema"], "buffers": state["buffers"]}
    host = multihost_utils.process_allgather(arrays, tiled=True)
    if jax.process_index() != 0:
        return
    flat = {}
    for part in ("params", "buffers"):
        for path, value in jax.tree_util.tree_leaves_with_path(host[part]):
            key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            flat[key] = np.asarray(value, np.float32)
    weights.save(directory, cfg.model, flat)
    with open(os.path.join(directory, weights.DATASET_FILE), "w") as f:
        json.dump(dataset, f, indent=2)


def train(cfg: config.TrainConfig) -> int:
    """The training loop; returns a process exit code."""
    config.validate(cfg)
    ds = data.open_dataset(cfg.data.path, cfg.data.text_array, cfg.data.latent_scale)
    check_fit(cfg, ds)
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
        cfg.checkpoint_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save
    )
    latest = ckpts.latest_step() if cfg.checkpoint.resume else None
    positions = [[0, 0, 0]] * streams
    if latest is not None:
        state, meta = ckpts.restore(latest, spec.abstract)
        saved = meta.get("data_positions") or positions
        if len(saved) == streams:
            positions = saved
        else:
            epoch = max(p[0] for p in saved) + 1
            log.warning(
                "checkpoint has %d data streams, this run %d: data order restarts at epoch %d",
                len(saved),
                streams,
                epoch,
            )
            positions = [[epoch, 0, 0]] * streams
        start = int(meta["step"])
    else:
        state = train_step.init_state(cfg, tx, spec, initial_model(cfg))
        start = 0
    if primary:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            f.write(config.to_json(cfg))
    first_stream = hosted[0].index
    start_positions = [data.Position(*positions[first_stream + i]) for i in range(len(hosted))]
    reader = data.BatchReader(
        hosted, cfg.data.batch_size // streams, start_positions, cfg.data.prefetch
    )
    first = train_step.global_batch(reader.next(), spec, cfg.data.batch_size)
    jitted = train_step.make_train_step(cfg, tx, spec, ds.latent_scale)
    step_fn = jitted.lower(spec.abstract, first).compile()
    flops = analytic_train_flops(cfg.model) * cfg.data.batch_size  # model FLOPs, for MFU
    reporter = Reporter(cfg, start, flops, json.loads(config.to_json(cfg)))
    samples = SampleGrids(cfg, ds, spec.graphdef, mesh) if cfg.log.sample_every else None
    stop = distributed.StopSignal()
    meta_base = {
        "seed": cfg.seed,
        "config": json.loads(config.to_json(cfg)),
        "dataset": {
            "root": ds.root,
            "autoencoder": ds.manifest.autoencoder,
            "text_encoders": ds.manifest.text_encoders,
            "text_array": ds.text_name,
            "latent_scale": ds.latent_scale,
        },
    }

    def save(step: int, data_positions: list[data.Position]):
        flat = [v for p in data_positions for v in dataclasses.astuple(p)]
        rows = [r[i : i + 3] for r in distributed.allgather_rows(flat) for i in range(0, len(r), 3)]
        ckpts.save(step, state, {**meta_base, "step": step, "data_positions": rows})

    def check(step: int, metrics: dict) -> dict:
        host = jax.device_get(metrics)
        if not bool(host["finite"]):
            raise TrainingError(
                f"non-finite loss or gradient at step {step} (loss={float(host['loss'])}, "
                f"grad_norm={float(host['grad_norm'])}); the state was not updated and no "
                f"checkpoint was written after step {ckpts.latest_step()}. Lower optim.lr, set "
                "optim.clip_norm, or check the data."
            )
        return host

    batch, code, step = first, 0, start
    pending = None  # (step, metrics, position) of the step whose metrics are not checked yet
    try:
        while step < cfg.steps:
            state, metrics = step_fn(state, batch)
            step += 1
            done_position = reader.positions
            if pending is not None:
                reporter.step(pending[0], check(pending[0], pending[1]))
            pending = (step, metrics, done_position)
            preempted = stop.should_stop(step)
            if step % cfg.checkpoint.every == 0 or step == cfg.steps or preempted:
                reporter.step(step, check(step, metrics))
                pending = None
                save(step, done_position)
            if samples and (step % cfg.log.sample_every == 0 or step == cfg.steps):
                grid = samples.grid(state)
                if primary:
                    write_grid(cfg.run_dir, step, grid)
                    reporter.image(step, grid)
            if preempted:
                reporter.message(f"stop signal: checkpoint of step {step} saved, exiting")
                break
            if step < cfg.steps:
                batch = train_step.global_batch(reader.next(), spec, cfg.data.batch_size)
        if pending is not None:
            reporter.step(pending[0], check(pending[0], pending[1]))
        ckpts.wait()
        if step == cfg.steps:
            export_ema(state, cfg, os.path.join(cfg.run_dir, "weights"), meta_base["dataset"])
            reporter.message(f"done: {step} steps; EMA weights in {cfg.run_dir}/weights")
        if reader.skipped_shards:
            skipped = reader.skipped_shards
            log.warning("skipped %d corrupt shards: %s", len(skipped), skipped)
    except TrainingError as e:
        reporter.message(f"error: {e}")
        ckpts.wait()
        code = EXIT_NONFINITE
    finally:
        reader.close()
        stop.restore()
        reporter.close()
        ckpts.close()
    return code


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
        config.validate(cfg)
        distributed.initialize(cfg.distributed)
        if jax.process_index() != 0:
            logging.getLogger().setLevel(logging.WARNING)
        t0 = time.perf_counter()
        code = train(cfg)
        log.info("finished in %.1f s", time.perf_counter() - t0)
        return code
    except (config.ConfigError, data.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
