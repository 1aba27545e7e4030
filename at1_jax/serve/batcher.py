"""Requests → batches: a bounded queue, a short gathering window, one call per setting and size.

One worker thread owns the model. It waits for a request, gathers whatever else arrives within
the window (or until the largest batch size is full), groups the images by sampler settings
(each setting is its own compiled program) and runs each group in calls of at most the largest
batch size, each padded up to the smallest batch size that holds it, so only those shapes are
ever compiled. Memory is bounded by the images submitted and not yet answered.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from at1_jax.model.samplers import SamplerConfig

log = logging.getLogger(__name__)

# (prompts, seeds, sampler, batch_size) -> one PNG per prompt, computed in one padded call.
RunFn = Callable[[list[str], list[int], SamplerConfig, int], list[bytes]]


class QueueFull(Exception):
    """The server holds its limit of queued images; the message says how many and the flag."""


@dataclasses.dataclass(frozen=True)
class Image:
    """One generated PNG and the compiled batch size it was made in (its bytes depend on it)."""

    png: bytes
    batch_size: int


@dataclasses.dataclass(frozen=True)
class Result:
    """A request's images in submission order, and the batch that made them."""

    images: list[Image]
    batch: dict


@dataclasses.dataclass
class _Job:
    prompts: list[str]
    seeds: list[int]
    sampler: SamplerConfig
    future: Future = dataclasses.field(default_factory=Future)
    submitted: float = dataclasses.field(default_factory=time.monotonic)


def batch_size_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest of the sorted `sizes` that holds n images (n <= the largest)."""
    return next(s for s in sizes if s >= n)


class Batcher:
    """Queues requests and runs them in batches on one worker thread."""

    def __init__(
        self,
        run: RunFn,
        batch_sizes: Sequence[int],
        max_queued_images: int,
        window_s: float,
        compiles: Callable[[], int] = lambda: 0,
    ):
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
        self.run, self.compiles = run, compiles
        self.sizes = sorted(set(batch_sizes))
        self.max_queued_images, self.window_s = max_queued_images, window_s
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._queued = 0  # images submitted and not yet answered
        self._closed = False
        self._batches = 0
        self.recent: collections.deque[dict] = collections.deque(maxlen=50)
        self._thread = threading.Thread(target=self._loop, name="at1-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[str], seeds: list[int], sampler: SamplerConfig) -> Future:
        """Queues one request (prompts[i] from the noise of seeds[i]); raises QueueFull."""
        n = len(prompts)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._queued + n > self.max_queued_images:
                raise QueueFull(
                    f"busy: {self._queued} images are queued and this request adds {n}, more "
                    f"than this server's limit of {self.max_queued_images} "
                    "(--max-queued-images); retry in a moment"
                )
            self._queued += n
            job = _Job(list(prompts), list(seeds), sampler)
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def stats(self) -> dict:
        """Queued images, batches run so far and the most recent ones."""
        with self._cond:
            return {
                "queued_images": self._queued,
                "batches": self._batches,
                "recent": list(self.recent),
            }

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops the worker after the batch it is running; queued requests are cancelled."""
        with self._cond:
            self._closed = True
            for job in self._pending:
                job.future.cancel()
            self._pending = []
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            deadline = self._pending[0].submitted + self.window_s if self._pending else 0.0
            while not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or sum(len(j.prompts) for j in self._pending) >= self.sizes[-1]:
                    break
                self._cond.wait(left)
            if self._closed:
                return None
            jobs, self._pending = self._pending, []
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            groups: dict[SamplerConfig, list[_Job]] = {}
            for job in jobs:  # dicts keep the order of the first request of each setting
                groups.setdefault(dataclasses.replace(job.sampler, seed=0), []).append(job)
            for sampler, group in groups.items():
                self._run_group(sampler, group)

    def _run_group(self, sampler: SamplerConfig, jobs: list[_Job]) -> None:
        flat = [(job, p, s) for job in jobs for p, s in zip(job.prompts, job.seeds, strict=True)]
        out: dict[int, list[Image]] = {id(job): [] for job in jobs}
        t0, c0, sizes_used = time.perf_counter(), self.compiles(), []
        try:
            for i in range(0, len(flat), self.sizes[-1]):
                chunk = flat[i : i + self.sizes[-1]]
                size = batch_size_for(len(chunk), self.sizes)
                pngs = self.run([p for _, p, _ in chunk], [s for _, _, s in chunk], sampler, size)
                for (job, _, _), png in zip(chunk, pngs, strict=True):
                    out[id(job)].append(Image(png, size))
                sizes_used.append(size)
        except Exception as e:  # the request fails, the server keeps serving
            log.exception("generation failed for %d request(s)", len(jobs))
            for job in jobs:
                job.future.set_exception(e)
            return
        finally:
            with self._cond:
                self._queued -= len(flat)
        with self._cond:
            self._batches += 1
            batch = {
                "id": self._batches,
                "requests": len(jobs),
                "images": len(flat),
                "batch_sizes": sizes_used,
                "xla_compiles": self.compiles() - c0,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            self.recent.append(batch)
        for job in jobs:
            job.future.set_result(Result(out[id(job)], batch))
