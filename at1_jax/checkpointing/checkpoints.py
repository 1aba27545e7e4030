"""Orbax checkpoints of the train state, local or on S3, atomic and asynchronous.

A checkpoint holds two items: `state` (params, EMA, optimiser state, buffers, step; sharded
arrays written by every process) and `meta` (JSON: step, seed, resolved config, data
positions of every process, dataset facts). Orbax writes into a temporary folder and
marks completion atomically; an interrupted save is never listed as a step.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from at1_jax.checkpointing import s3_orbax

log = logging.getLogger(__name__)

STATE, META = "state", "meta"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path."""


def _directory(path: str):
    if s3_orbax.is_s3(path):
        return s3_orbax.s3_path(path)
    return os.path.abspath(path)


class Checkpoints:
    """Save/restore/list train-state checkpoints in one folder (local or s3://)."""

    def __init__(self, path: str, keep: int = 3, async_save: bool = True, read_only=False):
        self.path = path
        s3 = s3_orbax.is_s3(path)
        if s3:
            s3_orbax.install()
            s3_orbax.refresh_clients()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
            # Object stores have no atomic rename: completion is a commit marker file.
            temporary_path_class=s3_orbax.commit_file_path_class() if s3 else None,
        )
        try:
            self._manager = ocp.CheckpointManager(
                _directory(path), options=options, item_names=(STATE, META)
            )
        except Exception as e:
            raise CheckpointError(f"cannot open checkpoint folder {path}: {e}") from e

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Start saving (returns once the arrays are copied off the devices)."""
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
        )
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:
            raise CheckpointError(f"saving step {step} to {self.path} failed: {e}") from e

    def wait(self) -> None:
        """Block until pending saves are complete; raises what a background save raised."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"saving to {self.path} failed: {e}") from e

    def restore_meta(self, step: int) -> dict:
        args = ocp.args.Composite(**{META: ocp.args.JsonRestore()})
        return self._manager.restore(step, args=args)[META]

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """The state at `step`, placed on `abstract_state`'s shardings (any mesh), and meta."""
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardRestore(abstract_state),
                META: ocp.args.JsonRestore(),
            }
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(f"restoring step {step} from {self.path} failed: {e}") from e
        return restored[STATE], restored[META]

    def close(self) -> None:
        self._manager.close()


def restore_params(path: str, abstract_params: dict, which: str = "ema") -> tuple[dict, dict]:
    """Only the (EMA) weights and buffers of the latest checkpoint, e.g. for sampling."""
    ckpt = Checkpoints(path, read_only=True, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {path}")
    meta = ckpt.restore_meta(step)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def placed(a):  # orbax needs a concrete sharding: default to one local device
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None) or one)

    target = jax.tree.map(
        placed, {which: abstract_params["params"], "buffers": abstract_params["buffers"]}
    )
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    args = ocp.args.Composite(
        **{
            STATE: ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            )
        }
    )
    try:
        restored = ckpt._manager.restore(step, args=args)[STATE]
    except Exception as e:
        raise CheckpointError(f"restoring weights of step {step} from {path} failed: {e}") from e
    ckpt.close()
    return {"params": restored[which], "buffers": restored["buffers"]}, meta
