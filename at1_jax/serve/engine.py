"""The JAX side of the server: PNGs for one padded call at one of the compiled batch sizes.

Builds on the sample pipeline (model, prompt-embedding cache, `Denoising`, decoders) so an
image is the same bytes `python -m at1_jax.sample --batch-size B` writes for its prompt, seed
and settings, B being the batch size it ran at (float rounding differs between batch sizes).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable

import jax
import numpy as np

from at1_jax.decode.images import png_bytes
from at1_jax.decode.pixels import make_decoder
from at1_jax.generate.pipeline import Denoising, Pipeline
from at1_jax.model.samplers import SamplerConfig

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA compilations in this process (jax.monitoring), to report them per batch."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.count += 1
                self.seconds += duration


class Engine:
    """A loaded pipeline; sampler programs kept per (settings, batch size), least recent out."""

    def __init__(self, pipe: Pipeline, max_programs: int):
        if max_programs < 1:
            raise ValueError(f"--max-programs must be >= 1, got {max_programs}")
        self.pipe, self.max_programs = pipe, max_programs
        self._programs: collections.OrderedDict[tuple[SamplerConfig, int], Denoising] = (
            collections.OrderedDict()
        )
        self._decoders: dict[int, Callable[[np.ndarray], np.ndarray]] = {}
        self.compiles = CompileCounter()

    @property
    def programs(self) -> int:
        """Sampler programs held (each compiled once, at its first call)."""
        return len(self._programs)

    def _denoising(self, sampler: SamplerConfig, batch_size: int) -> Denoising:
        key = (dataclasses.replace(sampler, seed=0), batch_size)
        denoising = self._programs.pop(key, None) or Denoising(self.pipe.model, batch_size)
        self._programs[key] = denoising
        while len(self._programs) > self.max_programs:  # its compiled program goes with it
            self._programs.popitem(last=False)
        return denoising

    def pngs(
        self, prompts: list[str], seeds: list[int], sampler: SamplerConfig, batch_size: int
    ) -> list[bytes]:
        """PNG bytes of prompts[i] from the noise of seeds[i], in one call padded to batch_size."""
        if len(prompts) > batch_size:
            raise ValueError(f"{len(prompts)} images do not fit one call of {batch_size}")
        text = self.pipe.embed(prompts)
        x0 = self._denoising(sampler, batch_size).latents(text, seeds, sampler)
        if batch_size not in self._decoders:  # sample decodes in batches of --batch-size too
            self._decoders[batch_size] = make_decoder(self.pipe.decode_spec, batch_size)
        return [png_bytes(img) for img in self._decoders[batch_size](x0)]
