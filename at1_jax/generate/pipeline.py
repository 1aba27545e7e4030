"""The text-to-image pipeline: load a denoiser, embed prompts, sample, decode to pixels.

Prompts are embedded on the PyTorch side (data_prep's text encoders, imported only when a
prompt is not in the embedding cache), denoised in JAX (one jitted sampler per batch shape),
and decoded by the Flax VAE decoder (default), diffusers in PyTorch (`--decode torch`), or
the identity map for pixel-space models. Image k of a prompt starts from the noise of seed
`--seed + k`, so any image can be remade alone and the same seed gives the same PNG bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from at1_io.constants import DEFAULT_TEXT_ENCODER
from at1_jax import torch_bridge
from at1_jax.checkpointing.load import DEFAULT_CACHE, MissingFiles, load_model
from at1_jax.decode.pixels import DecodeSpec, make_decoder, resolve_decode
from at1_jax.model.denoiser import Denoiser
from at1_jax.model.samplers import SamplerConfig, make_sampler, start_noise

VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
TEXT_FILES = ("config.json", "model.safetensors", "tokenizer files")


# ----------------------------------------------------------------------------- model files


def _local_model_ok(path: str, files: Sequence[str]) -> bool:
    return os.path.isdir(path) and all(
        os.path.isfile(os.path.join(path, f)) for f in files if "." in f
    )


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # a malformed id is simply not cached
        return False


def require_model(what: str, flag: str, id_or_path: str, files: Sequence[str]) -> None:
    """Raises MissingFiles unless a model folder / cached hub id is usable offline."""
    if os.path.exists(id_or_path) or id_or_path.startswith(("/", ".", "~")):
        if _local_model_ok(id_or_path, files):
            return
        raise MissingFiles(
            f"{what} folder {id_or_path} not found or incomplete: it needs "
            f"{', '.join(files)} (a save_pretrained folder). Pass the right one with {flag}."
        )
    if _in_hub_cache(id_or_path, "config.json"):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise MissingFiles(
            f"{what} {id_or_path!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set. "
            f"Put a folder with {', '.join(files)} on this machine (e.g. `hf download "
            f"{id_or_path}` elsewhere, then copy it) and pass {flag} /that/folder."
        )


def text_encoder_spec(value: str) -> tuple[str, str]:
    """`kind=model` (data_prep's form, name prefix ignored) or a bare model (taken as CLIP)."""
    head, sep, model = value.partition("=")
    if not sep:
        return "clip", value
    kind = head.rpartition(":")[2]
    if kind not in ("clip", "sentence", "t5"):
        raise ValueError(f"--text-encoder {value!r}: kind must be clip, sentence or t5")
    if kind == "t5":
        raise ValueError(
            f"--text-encoder {value!r}: T5 gives per-token features; the denoiser takes one "
            "pooled vector per prompt (clip or sentence)"
        )
    return kind, model


# ----------------------------------------------------------------------------- text


def _cache_file(cache_dir: str, kind: str, model: str, prompt: str) -> str:
    # Local folders are keyed by their absolute path: a relative path means different models
    # in different working directories.
    ident = os.path.abspath(model) if os.path.exists(model) else model
    key = hashlib.sha256(f"{kind}={ident}\n{prompt}".encode()).hexdigest()
    return os.path.join(cache_dir, "text", key[:2], key + ".npy")


def embed_prompts(
    prompts: Sequence[str], encoder: str, cache_dir: str = DEFAULT_CACHE, batch_size: int = 64
) -> np.ndarray:
    """f32[N, D] pooled text vectors, from the on-disk cache or data_prep's encoder (fp16 values).

    The encoder is loaded only if some prompt is not cached; values are rounded to fp16
    exactly as the data stage stores them, so generation sees what training saw.
    """
    kind, model = text_encoder_spec(encoder)
    files = {p: _cache_file(cache_dir, kind, model, p) for p in prompts}
    todo = sorted({p for p, f in files.items() if not os.path.isfile(f)})
    if todo:
        require_model("text encoder", "--text-encoder", model, TEXT_FILES)
        _encode_to_cache(todo, kind, model, files, batch_size)
    return np.stack([np.load(files[p]).astype(np.float32) for p in prompts])


@functools.lru_cache(maxsize=2)
def _prompt_encoder(kind: str, model: str):
    # Loaded once per process (evaluate and serve embed new prompts call after call).
    return torch_bridge.prompt_encoder(kind, model)


def _encode_to_cache(todo, kind, model, files, batch_size) -> None:
    enc = _prompt_encoder(kind, model)  # PyTorch only for prompts never seen
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        pooled = enc.encode(chunk)[f"{kind}_pooled"]
        for prompt, vec in zip(chunk, pooled, strict=True):
            path = files[prompt]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
                np.save(f, vec)
            os.replace(f.name, path)


# ----------------------------------------------------------------------------- denoise


class Denoising:
    """Batched guided sampling of one model; one compiled program per sampler config."""

    def __init__(self, model: Denoiser, batch_size: int):
        self.cfg = model.cfg
        self.batch_size = batch_size
        self.graphdef, self.state = nnx.split(model)
        self._runs: dict[SamplerConfig, Callable] = {}

    def _run(self, sampler: SamplerConfig) -> Callable:
        key = dataclasses.replace(sampler, seed=0)  # the seed is not part of the program
        if key not in self._runs:
            graphdef = self.graphdef

            def denoise(x, sigma, text, state):
                return nnx.merge(graphdef, state)(x, sigma, text)

            c = self.cfg
            shape = (c.latent_channels, c.latent_size, c.latent_size)
            self._runs[key] = make_sampler(denoise, key, shape)
        return self._runs[key]

    def latents(
        self,
        text_ND: np.ndarray,
        seeds: Sequence[int],
        sampler: SamplerConfig,
        on_batch: Callable[[int], None] | None = None,
    ):
        """f32[N, C, H, W] x0 for N text vectors; the last batch is padded, not recompiled.

        `on_batch(n)` is called after each batch of n images (progress bars).
        """
        run, b, c = self._run(sampler), self.batch_size, self.cfg
        shape = (c.latent_channels, c.latent_size, c.latent_size)
        out = []
        for i in range(0, len(seeds), b):
            n = min(b, len(seeds) - i)
            text = np.zeros((b, text_ND.shape[1]), np.float32)
            text[:n] = text_ND[i : i + n]
            s = np.zeros(b, np.uint32)
            s[:n] = np.asarray(seeds[i : i + n], np.int64).astype(np.uint32)
            x0 = run(jnp.asarray(text), start_noise(s, shape), self.state)
            out.append(np.asarray(x0)[:n])
            if on_batch is not None:
                on_batch(n)
        return np.concatenate(out)


# ----------------------------------------------------------------------------- decode


def require_decoder(spec: DecodeSpec) -> None:
    """Raises MissingFiles if the VAE weights are not available offline."""
    if spec.mode in ("jax", "torch"):
        require_model("VAE", "--vae", spec.vae, VAE_FILES)
    if spec.mode == "torch":
        torch_bridge.require("--decode torch")


# ----------------------------------------------------------------------------- pipeline


class Pipeline:
    """Checkpoint + text encoder + decoder, loaded once; `generate` makes uint8 images."""

    def __init__(
        self,
        checkpoint: str,
        *,
        text_encoder: str | None = None,
        decode: str = "jax",
        vae: str | None = None,
        latent_scale: float | None = None,
        batch_size: int = 16,
        cache_dir: str = DEFAULT_CACHE,
    ):
        self.model, self.info = load_model(checkpoint, cache_dir)
        cfg = self.model.cfg
        self.text_encoder = text_encoder or self.info.get("text_encoder") or DEFAULT_TEXT_ENCODER
        text_encoder_spec(self.text_encoder)  # a bad value fails here, before any work
        self.decode_spec = resolve_decode(self.info, cfg.latent_channels, decode, vae, latent_scale)
        self.batch_size, self.cache_dir = batch_size, cache_dir
        self.denoising = Denoising(self.model, batch_size)
        self._decoder = None
        self.timing = {"embed_s": 0.0, "denoise_s": 0.0, "decode_s": 0.0}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Pipeline:
        """A pipeline from the command-line flags that sample and evaluate share."""
        return cls(
            args.checkpoint,
            text_encoder=args.text_encoder,
            decode=args.decode,
            vae=args.vae,
            latent_scale=args.latent_scale,
            batch_size=args.batch_size,
            cache_dir=args.cache_dir,
        )

    def require(self, prompts: Sequence[str]) -> None:
        """Fails with MissingFiles now if any model file needed for `prompts` is missing."""
        kind, model = text_encoder_spec(self.text_encoder)
        if not all(
            os.path.isfile(_cache_file(self.cache_dir, kind, model, p)) for p in set(prompts)
        ):
            require_model("text encoder", "--text-encoder", model, TEXT_FILES)
            torch_bridge.require("prompt encoding")
        require_decoder(self.decode_spec)

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        t0 = time.perf_counter()
        text = embed_prompts(prompts, self.text_encoder, self.cache_dir)
        if text.shape[1] != self.model.cfg.text_dim:
            raise ValueError(
                f"text encoder {self.text_encoder} gives {text.shape[1]}-d vectors; the model "
                f"takes {self.model.cfg.text_dim}-d (pass the encoder it was trained with)"
            )
        self.timing["embed_s"] += time.perf_counter() - t0
        return text

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: SamplerConfig,
        on_batch: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 NHWC images, f32 x0 latents) for prompts[i] from the noise of seeds[i]."""
        text = self.embed(prompts)
        t0 = time.perf_counter()
        x0 = self.denoising.latents(text, seeds, sampler, on_batch)
        t1 = time.perf_counter()
        if self._decoder is None:
            self._decoder = make_decoder(self.decode_spec, self.batch_size)
        imgs = self._decoder(x0)
        self.timing["denoise_s"] += t1 - t0
        self.timing["decode_s"] += time.perf_counter() - t1
        return imgs, x0
