"""Sample grids from the EMA weights for the dataset's validation prompts, during training."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
from flax import nnx

from at1_io import schema, storage
from at1_io.constants import PIXEL
from at1_jax.decode import images
from at1_jax.decode.pixels import DecodeSpec, make_decoder
from at1_jax.model.samplers import SamplerConfig, make_sampler, start_noise
from at1_jax.train import sharding
from at1_jax.train.data import Dataset

log = logging.getLogger(__name__)


def validation_prompts(ds: Dataset, limit: int) -> tuple[list[str], np.ndarray]:
    """(captions, pooled text vectors) from the dataset's val_prompts.tar, at most `limit`."""
    if not ds.manifest.val_prompts:
        return [], np.zeros((0, ds.text_dim), np.float32)
    url = storage.join(ds.root, ds.manifest.val_prompts.get("path", schema.VAL_PROMPTS_PATH))
    samples = list(schema.iter_shard_samples(storage.read_bytes(url), "val_prompts"))[:limit]
    texts = [s[schema.CAPTION_FIELD] for s in samples]
    return texts, np.stack([s[ds.text_name] for s in samples]).astype(np.float32)


class SampleGrids:
    """Builds the jitted sampler once; `grid(state)` returns a uint8 image grid."""

    def __init__(self, cfg, ds: Dataset, graphdef, mesh):
        self.ds, self.cfg = ds, cfg
        self.prompts, self.text = validation_prompts(ds, cfg.log.num_samples)
        if not self.prompts:  # no validation prompts: unconditional samples
            self.text = np.zeros((cfg.log.num_samples, ds.text_dim), np.float32)
        sampler = SamplerConfig(
            steps=cfg.log.sample_steps, guidance=cfg.log.sample_guidance, seed=cfg.log.sample_seed
        )
        # Like `sample --num-images 1`: every prompt from log.sample_seed; unconditional
        # samples (no prompts) from consecutive seeds, so that they differ.
        base, n = cfg.log.sample_seed, len(self.text)
        self.seeds = [base] * n if self.prompts else [base + i for i in range(n)]

        def denoise(x, sigma, text, params, buffers):
            return nnx.merge(graphdef, params, buffers)(x, sigma, text)

        run = make_sampler(denoise, sampler, ds.latent_shape)
        # Replicated output: every process holds the whole batch, process 0 writes it.
        self._run = jax.jit(run, out_shardings=sharding.replicated(mesh))
        self._decode = self._decoder()

    def _decoder(self):
        ae = self.ds.manifest.autoencoder
        source = self.cfg.log.vae or ae.get("model", "")
        pixels = ae.get("kind") == PIXEL
        mode = "none" if source == "none" or not source else "jax"
        # The trainer multiplied raw latents by ds.latent_scale; decoding undoes it.
        spec = DecodeSpec(PIXEL if pixels else mode, source, 1.0 / self.ds.latent_scale, 0.0)
        try:
            return make_decoder(spec, self.cfg.log.num_samples)
        except Exception as e:  # no VAE weights offline: show latents instead of failing
            log.warning("sample grids show latents: cannot load VAE %r (%s)", source, e)
            return make_decoder(dataclasses.replace(spec, mode="none"), 0)

    def latents(self, state: dict) -> np.ndarray:
        """f32[N, C, H, W] x0 of the EMA weights for the grid's prompts and seeds."""
        # Host values like the text: every process passes the same replicated input.
        noise = np.asarray(start_noise(np.asarray(self.seeds, np.uint32), self.ds.latent_shape))
        return np.asarray(self._run(self.text, noise, state["ema"], state["buffers"]))

    def sheet(self, state: dict, step: int) -> list[np.ndarray]:
        """Labelled pages: each sample with its prompt, seed and guidance; title run and step."""
        latents = self.latents(state)
        log_cfg = self.cfg.log
        prompts = self.prompts or ["(unconditional)"] * len(latents)
        captions = [
            f"{p}\nseed {s} · guidance {log_cfg.sample_guidance:g}"
            for p, s in zip(prompts, self.seeds, strict=True)
        ]
        title = f"{self.cfg.name} · step {step} · {log_cfg.sample_steps} steps, EMA weights"
        return images.sheet(self._decode(latents), captions, title)


def write_grid(run_dir: str, step: int, pages: list[np.ndarray]) -> list[str]:
    """RUN/samples/step_00000100.png (and -2, -3… for more pages)."""
    return images.save_pages(pages, os.path.join(run_dir, "samples", f"step_{step:08d}.png"))
