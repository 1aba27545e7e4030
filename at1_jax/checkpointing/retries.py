"""How long checkpoint storage requests are retried: one budget, one backoff, one log line each.

An S3 request that fails with a connection error, a timeout or a 5xx answer is retried with
exponential backoff until `seconds` have passed since its first failure, then the save or
restore fails naming the URL. The same schedule is given to TensorStore (array data) through
its `s3_request_retries` context resource; its own default is 32 tries over ~15 minutes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 120.0


class StorageUnavailable(OSError):
    """Storage did not answer within the retry budget; the message names the URL."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Retry a failing storage request for `seconds` with delays doubling up to a cap."""

    seconds: float = DEFAULT_SECONDS

    def __post_init__(self):
        if not self.seconds > 0:
            raise ValueError(f"retry seconds must be > 0, got {self.seconds!r}")

    @property
    def initial_delay(self) -> float:
        return min(1.0, self.seconds / 8)

    @property
    def max_delay(self) -> float:
        # Several tries even near the end of the budget: a server back after a restart is seen.
        return max(self.initial_delay, min(30.0, self.seconds / 4))

    def delays(self) -> list[float]:
        """Waits before each retry; they add up to at least `seconds`."""
        out, total = [], 0.0
        while total < self.seconds:
            d = min(self.initial_delay * 2 ** len(out), self.max_delay)
            out.append(d)
            total += d
        return out

    def tensorstore_context(self) -> dict:
        """TensorStore's `s3_request_retries` resource with this schedule."""
        return {
            "s3_request_retries": {
                "max_retries": len(self.delays()),
                "initial_delay": f"{self.initial_delay}s",
                "max_delay": f"{self.max_delay}s",
            }
        }


async def retry_async(
    call: Callable[[], Awaitable],
    policy: RetryPolicy,
    what: str,
    retryable: Callable[[BaseException], bool],
    abandon: Callable[[], str | None] = lambda: None,
):
    """`await call()`, retried on `retryable` errors per `policy`; logs one line per retry."""
    # abandon() returning a message stops early: the operation this request belongs to has
    # already failed (here or in another process), so waiting helps no one.
    delays = policy.delays()
    first_failure, attempt = None, 0
    while True:
        try:
            return await call()
        except Exception as e:
            if not retryable(e):
                raise
            now = time.monotonic()
            first_failure = first_failure or now
            elapsed = now - first_failure
            given_up = abandon()
            if given_up is not None:
                raise StorageUnavailable(f"{what}: not retried, already failed: {given_up}") from e
            if attempt == len(delays) or elapsed >= policy.seconds:
                raise StorageUnavailable(
                    f"{what}: no answer after {attempt + 1} tries over {elapsed:.0f} s "
                    f"(retry budget {policy.seconds:g} s): {type(e).__name__}: {e}"
                ) from e
            delay = min(delays[attempt], policy.seconds - elapsed)
            attempt += 1
            log.warning(
                "%s failed (%s: %s); retry %d of %d in %.1f s, giving up %.0f s after the "
                "first failure",
                what,
                type(e).__name__,
                e,
                attempt,
                len(delays),
                delay,
                policy.seconds,
            )
            await asyncio.sleep(delay)
