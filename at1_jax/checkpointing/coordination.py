"""Processes of a run wait for each other with deadlines and stop together when one fails.

Orbax's barriers wait up to 5–20 minutes for a process whose save has already failed, and
its main-thread barriers are collectives with no deadline at all. Here every barrier and
agreement goes through jax.distributed's key-value store (the one orbax's own distributed
barriers use; JAX has no public API for it), has a deadline, and stops as soon as any
process reports a failure of the current operation: all processes then raise the same
error and none is left waiting. With one process everything is local.
"""

from __future__ import annotations

import threading
import time

import jax

PREFIX = "at1_checkpoint"
POLL_SECONDS = 0.05


class Aborted(RuntimeError):
    """Another process (or this one) reported a failure of the current operation."""


_lock = threading.Lock()
_operation: str | None = None
_counts: dict[str, int] = {}
_failed_here: dict[str, str] = {}  # operation -> the first failure this process reported


def _client():
    if jax.process_count() == 1:
        return None
    from jax._src import distributed  # the key-value store has no public API

    return distributed.global_state.client


def begin(operation: str) -> None:
    """Start an operation (same name on every process): failures are reported against it."""
    global _operation
    with _lock:
        _operation = operation
        _failed_here.clear()


def operation() -> str | None:
    return _operation


def _abort_key(op: str) -> str:
    return f"{PREFIX}/abort/{op}"


def report_failure(message: str) -> None:
    """Tell every process that the current operation failed here (the first report wins)."""
    client, op = _client(), _operation
    if op is None:
        return
    with _lock:
        _failed_here.setdefault(op, message)
    if client is None:
        return
    try:
        client.key_value_set(_abort_key(op), f"process {jax.process_index()}: {message}")
    except Exception:  # already reported, by us or another process
        pass


def failure() -> str | None:
    """The failure reported for the current operation by any process, if any."""
    client, op = _client(), _operation
    if op is None:
        return None
    if client is not None:
        try:
            return client.key_value_try_get(_abort_key(op))
        except Exception:  # nothing reported by any process (or the store is gone)
            pass
    return _failed_here.get(op)


def _gather(name: str, value: str, timeout_s: float, abortable: bool) -> dict[int, str]:
    """Publish `value` under `name` and return every process's value, or raise."""
    client = _client()
    with _lock:
        count = _counts.get(name, 0)
        _counts[name] = count + 1
    base = f"{PREFIX}/sync/{name}"
    folder = f"{base}#{count}/"
    me, n = jax.process_index(), jax.process_count()
    client.key_value_set(f"{folder}{me}", value)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = dict(client.key_value_dir_get(folder))
        except Exception as e:
            raise Aborted(f"lost the jax.distributed coordinator at {name}: {e}") from e
        values = {int(k.rsplit("/", 1)[-1]): v for k, v in found.items()}
        if len(values) == n:
            break
        reported = failure() if abortable else None
        if reported is not None:
            raise Aborted(reported)
        if time.monotonic() > deadline:
            missing = sorted(set(range(n)) - set(values))
            raise TimeoutError(
                f"processes {missing} did not reach {name!r} within {timeout_s:.0f} s"
            )
        time.sleep(POLL_SECONDS)
    if count:  # every process has passed the previous round: its keys are no longer read
        try:
            client.key_value_delete(f"{base}#{count - 1}/{me}")
        except Exception:  # a leftover key costs a few bytes
            pass
    return values


def barrier(name: str, timeout_s: float) -> None:
    """Wait until every process reaches `name`; raises Aborted or TimeoutError instead."""
    if _client() is None:
        return
    _gather(name, "", timeout_s, abortable=True)


def orbax_barrier(*, key: str, timeout_ms: int) -> None:
    """`barrier` with orbax's `barrier_sync_fn` signature."""
    barrier(key, timeout_ms / 1000)


def allgather(name: str, value: str, timeout_s: float) -> list[str]:
    """Every process's `value` for `name`, in process order (not stopped by failures)."""
    if _client() is None:
        return [value]
    values = _gather(name, value, timeout_s, abortable=False)
    return [values[p] for p in sorted(values)]


def agree(name: str, error: str | None, timeout_s: float) -> dict[int, str]:
    """Every process's error for `name` ({} when all succeeded), the same on all processes."""
    # Not stopped by a reported failure: this is where the processes compare what happened.
    if _client() is None:
        return {} if error is None else {0: error}
    values = _gather(name, "" if error is None else f"!{error}", timeout_s, abortable=False)
    return {p: v[1:] for p, v in sorted(values.items()) if v}
