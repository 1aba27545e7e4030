"""Orbax checkpoints of the train state, local or on S3: atomic, asynchronous, verified.

A checkpoint holds two items: `state` (params, EMA, optimiser state, buffers, step; sharded
arrays written by every process) and `meta` (JSON: step, seed, resolved config, data
positions of every process, dataset facts). Orbax writes into a temporary folder and
marks completion atomically; an interrupted save is never listed as a step.

Storage faults: every S3 request retries for `retry_seconds` (a log line per retry), then
the save fails with a CheckpointError naming the URL, on every process of the run at the
same call (see `coordination`); steps committed before the fault are untouched.
Corruption: checksums of every array and of the metadata are written with each step and
compared after every restore; `restore_latest` falls back past a corrupt step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

import jax
import orbax.checkpoint as ocp

from at1_jax.checkpointing import checksums, coordination, retries, s3_orbax

log = logging.getLogger(__name__)

STATE, META = "state", "meta"
INTEGRITY = "_integrity"  # the checksums, inside meta; never returned to callers
AGREE_SECONDS = 1200  # only a dead process makes the others wait this long
# Orbax wraps each TensorStore read error in this, with a bound method printed in place of
# the spec: the TensorStore error under it is the one worth reading.
_ORBAX_READ_WRAPPER = "Encountered error while reading array index"
# What a storage request that ran out of retries says: ours (s3fs) and TensorStore's (curl).
_STORAGE = re.compile(r"no answer after \d+ tries|UNAVAILABLE|CURL error|retry attempts failed")
# What TensorStore and orbax say when the bytes they read are not what was written.
_CORRUPTION = re.compile(r"DATA_LOSS|[Dd]ata corruption|Error decoding|checksum|[Mm]agic")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path."""


class CheckpointStorageError(CheckpointError):
    """Storage did not answer within the retry budget; earlier steps are intact: rerun later."""


class CorruptCheckpoint(CheckpointError):
    """A step whose bytes are not what was written (checksum mismatch or undecodable)."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def _directory(path: str):
    if s3_orbax.is_s3(path):
        return s3_orbax.s3_path(path)
    return os.path.abspath(path)


def _chain(error: BaseException):
    seen = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _reason(error: BaseException) -> str:
    """The most telling message in an exception chain: ours, else the first readable one."""
    chain = list(_chain(error))
    for e in chain:
        if isinstance(e, retries.StorageUnavailable | coordination.Aborted):
            return str(e)
    for e in chain:
        if str(e) and not str(e).startswith(_ORBAX_READ_WRAPPER):
            return str(e)
    return type(error).__name__


def _kind(error: BaseException) -> str:
    """'storage', 'aborted', 'corrupt' or 'error' (decides whether an older step is tried)."""
    chain = list(_chain(error))
    if any(isinstance(e, retries.StorageUnavailable) or _STORAGE.search(str(e)) for e in chain):
        return "storage"
    if any(isinstance(e, coordination.Aborted) for e in chain):
        return "aborted"
    if any(isinstance(e, UnicodeDecodeError | json.JSONDecodeError) for e in chain):
        return "corrupt"
    if any(_CORRUPTION.search(str(e)) for e in chain):
        return "corrupt"
    return "error"


def _array_checksums(tree: dict, name: str) -> dict[str, str]:
    """Checksums of `tree`'s arrays, with the partial sums of all processes added up."""
    return checksums.arrays(tree, lambda local: coordination.allgather(name, local, AGREE_SECONDS))


class Checkpoints:
    """Save/restore/list train-state checkpoints in one folder (local or s3://)."""

    def __init__(
        self,
        path: str,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
        retry_seconds: float = retries.DEFAULT_SECONDS,
    ):
        self.path = path
        self._s3 = s3_orbax.is_s3(path)
        try:
            self._policy = retries.RetryPolicy(retry_seconds)
        except ValueError as e:
            raise CheckpointError(f"checkpoints {path}: {e}") from e
        self._pending: int | None = None  # the step whose background save is not settled
        self._failed = False
        self._corrupt: set[int] = set()  # steps restore_latest fell back from
        # Operation names are shared by all processes: the same path hashes alike everywhere.
        self._tag = hashlib.sha256(path.encode()).hexdigest()[:12]
        s3_orbax.install_barriers()
        if self._s3:
            s3_orbax.install()
            s3_orbax.refresh_clients()
            s3_orbax.configure(self._policy)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
            async_options=ocp.options.AsyncOptions(
                # Created in save(): a failure raises there, not in a thread that others
                # wait for (orbax's asynchronous creation left them waiting 300 s).
                create_directories_asynchronously=False,
                barrier_sync_fn=coordination.orbax_barrier,
            ),
            # Object stores have no atomic rename: completion is a commit marker file.
            temporary_path_class=s3_orbax.commit_file_path_class() if self._s3 else None,
        )
        try:
            self._manager = ocp.CheckpointManager(
                _directory(path), options=options, item_names=(STATE, META)
            )
        except Exception as e:
            message = f"cannot open checkpoint folder {path}: {_reason(e)}"
            if _kind(e) == "storage":
                raise CheckpointStorageError(message) from e
            raise CheckpointError(message) from e

    def _begin(self, what: str) -> None:
        if self._s3:
            s3_orbax.configure(self._policy)
        coordination.begin(f"{self._tag}/{what}")

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _save_failed(self, step: int, error: BaseException) -> CheckpointError:
        """The error every process raises: the first failure any of them reported."""
        self._failed = True
        reason = coordination.failure() or _reason(error)
        coordination.report_failure(reason)
        message = f"saving step {step} to {self.path} failed: {reason}"
        if _STORAGE.search(reason):
            return CheckpointStorageError(message)
        return CheckpointError(message)

    def _settle(self) -> None:
        """Wait for the pending background save; raise its failure as a CheckpointError."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(step, e) from e

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Start saving (returns once copied off the devices); raises a previous save's failure."""
        self._settle()
        self._begin(f"save/{step}")
        try:
            for bad in sorted(self._corrupt):
                log.warning("deleting corrupt checkpoint step %d of %s", bad, self.path)
                self._manager.delete(bad)
            self._corrupt.clear()
            integrity = {
                "arrays": _array_checksums(state, f"{self._tag}/checksums/save/{step}"),
                "meta_sha256": checksums.metadata(meta),
            }
            args = ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    META: ocp.args.JsonSave({**meta, INTEGRITY: integrity}),
                }
            )
            self._manager.save(step, args=args, force=True)
        except Exception as e:
            raise self._save_failed(step, e) from e
        self._pending = step

    def wait(self) -> None:
        """Block until pending saves are complete; raises what a background save raised."""
        self._settle()

    def _restore(self, step: int, args) -> dict:
        """Restore on every process, and agree on the outcome before anything collective."""
        self._begin(f"restore/{step}")
        restored, failure = None, None
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:
            failure = f"{_kind(e)}:{_reason(e)}"
            coordination.report_failure(_reason(e))
        errors = coordination.agree(f"{self._tag}/restored/{step}", failure, AGREE_SECONDS)
        if not errors:
            return restored
        kinds = {p: e.split(":", 1) for p, e in errors.items()}
        real = {p: ke for p, ke in kinds.items() if ke[0] != "aborted"} or kinds
        process, (_, reason) = next(iter(real.items()))
        where = f" (process {process})" if jax.process_count() > 1 else ""
        message = f"restoring step {step} from {self.path} failed{where}: {reason}"
        if all(k == "corrupt" for k, _ in real.values()):
            raise CorruptCheckpoint(step, message)
        if any(k == "storage" for k, _ in real.values()):
            raise CheckpointStorageError(message)
        raise CheckpointError(message)

    def _verified_meta(self, step: int, meta: dict) -> tuple[dict, dict | None]:
        """`meta` without its checksums, after checking them; raises CorruptCheckpoint."""
        meta = dict(meta)
        integrity = meta.pop(INTEGRITY, None)
        if integrity is None:
            log.warning(
                "checkpoint step %d of %s has no checksums (written before they were "
                "added): restored unverified",
                step,
                self.path,
            )
        elif checksums.metadata(meta) != integrity.get("meta_sha256"):
            raise CorruptCheckpoint(
                step,
                f"checkpoint step {step} of {self.path} is corrupt: its metadata does not "
                "match the checksum written at save",
            )
        return meta, integrity

    def _verify_arrays(self, step: int, tree: dict, integrity: dict | None) -> None:
        if integrity is None:
            return
        expected = integrity["arrays"]
        found = _array_checksums(tree, f"{self._tag}/checksums/restore/{step}")
        bad = sorted(k for k, v in found.items() if expected.get(k) != v)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CorruptCheckpoint(
                step,
                f"checkpoint step {step} of {self.path} is corrupt: {len(bad)} of "
                f"{len(found)} arrays differ from the checksums written at save ({shown})",
            )

    def restore_meta(self, step: int) -> dict:
        """The metadata of `step`, checked against its checksum."""
        restored = self._restore(step, ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        return self._verified_meta(step, restored[META])[0]

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """The verified state at `step` on `abstract_state`'s shardings (any mesh), and meta."""
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardRestore(abstract_state),
                META: ocp.args.JsonRestore(),
            }
        )
        restored = self._restore(step, args)
        meta, integrity = self._verified_meta(step, restored[META])
        self._verify_arrays(step, restored[STATE], integrity)
        return restored[STATE], meta

    def _newest_intact(self, attempt):
        """attempt(step) for the newest step that is not corrupt; warns about each skipped."""
        skipped = []
        for step in reversed(self.steps()):
            try:
                result = attempt(step)
            except CorruptCheckpoint as e:
                log.warning("%s; trying the previous complete step", e)
                skipped.append(e)
                continue
            if skipped:
                log.warning(
                    "restored step %d of %s instead of the newer corrupt step(s) %s",
                    step,
                    self.path,
                    ", ".join(str(e.step) for e in skipped),
                )
            self._corrupt.update(e.step for e in skipped)
            return step, result
        if skipped:
            raise CheckpointError(
                f"no intact checkpoint in {self.path}: " + "; ".join(str(e) for e in skipped)
            )
        return None

    def restore_latest(self, abstract_state: dict) -> tuple[int, dict, dict] | None:
        """(step, state, meta) of the newest intact step (None: no step); warns of skipped ones."""
        # A skipped step is deleted at this object's next save: it would stay the latest.
        found = self._newest_intact(lambda step: self.restore(step, abstract_state))
        if found is None:
            return None
        step, (state, meta) = found
        return step, state, meta

    def latest_meta(self) -> tuple[int, dict] | None:
        """(step, metadata) of the newest step whose metadata is intact; None: no step."""
        return self._newest_intact(self.restore_meta)

    def close(self) -> None:
        """Finish pending saves and release orbax's threads; quiet after a reported failure."""
        try:
            self._settle()
        finally:
            try:
                self._manager.close()
            except Exception as e:
                if not self._failed:  # a failure already raised would only be repeated
                    raise CheckpointError(
                        f"closing checkpoints {self.path} failed: {_reason(e)}"
                    ) from e


def restore_params(path: str, abstract_params: dict, which: str = "ema") -> tuple[dict, dict]:
    """Only the (EMA) weights and buffers of the newest intact checkpoint, e.g. for sampling."""
    ckpt = Checkpoints(path, read_only=True, async_save=False)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def placed(a):  # orbax needs a concrete sharding: default to one local device
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None) or one)

    target = jax.tree.map(
        placed, {which: abstract_params["params"], "buffers": abstract_params["buffers"]}
    )
    args = ocp.args.Composite(
        **{
            STATE: ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            ),
            META: ocp.args.JsonRestore(),
        }
    )

    def attempt(step):
        restored = ckpt._restore(step, args)
        meta, integrity = ckpt._verified_meta(step, restored[META])
        ckpt._verify_arrays(step, restored[STATE], integrity)
        return restored[STATE], meta

    try:
        found = ckpt._newest_intact(attempt)
    finally:
        ckpt.close()
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {path}")
    _, (restored, meta) = found
    return {"params": restored[which], "buffers": restored["buffers"]}, meta
