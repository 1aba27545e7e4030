"""The `python -m at1_jax.sample` command line that remakes served images byte for byte."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from at1_jax.model.samplers import SamplerConfig


def model_flags(
    checkpoint: str,
    *,
    text_encoder: str | None,
    vae: str | None,
    decode: str,
    latent_scale: float | None,
    cache_dir: str,
    default_cache_dir: str,
) -> list[str]:
    """The sample flags that pick the same model, text encoder, decoder and embedding cache."""
    flags = ["--checkpoint", checkpoint]
    if text_encoder:
        flags += ["--text-encoder", text_encoder]
    if vae:
        flags += ["--vae", vae]
    if decode != "jax":
        flags += ["--decode", decode]
    if latent_scale is not None:
        flags += ["--latent-scale", repr(float(latent_scale))]
    if cache_dir != default_cache_dir:
        flags += ["--cache-dir", cache_dir]
    return flags


def sample_command(
    flags: Sequence[str],
    prompts: Sequence[str],
    num_images: int,
    sampler: SamplerConfig,
    batch_size: int,
) -> str:
    """A shell line: image k of each prompt from seed sampler.seed + k, at `batch_size`."""
    argv = ["python", "-m", "at1_jax.sample", *flags]
    argv += [f"--prompt={p}" for p in prompts]  # `=`: a prompt may start with "-"
    argv += [
        "--num-images",
        str(num_images),
        "--seed",
        str(sampler.seed),
        "--steps",
        str(sampler.steps),
    ]
    argv += ["--guidance", repr(float(sampler.guidance)), "--sampler", sampler.sampler]
    argv += ["--batch-size", str(batch_size)]
    return shlex.join(argv)
