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
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from at1_io.constants import DEFAULT_TEXT_ENCODER, DEFAULT_VAE, PIXEL, REFERENCE_LATENT_SCALE
from at1_jax.decode import images
from at1_jax.model import weights
from at1_jax.model.denoiser import Denoiser
from at1_jax.model.samplers import SamplerConfig, make_sampler

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "at1_jax")
DECODERS = ("jax", "torch", "none")
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
TEXT_FILES = ("config.json", "model.safetensors", "tokenizer files")


class MissingFiles(Exception):
    """A model or data file the command needs is not there; the message says what to do."""


# ----------------------------------------------------------------------------- checkpoint


def _fetch_s3_folder(url: str, files: Sequence[str], cache_dir: str) -> str:
    """Copies files of an s3:// folder into the cache (once) and returns the local folder."""
    import fsspec

    local = os.path.join(cache_dir, "checkpoints", hashlib.sha256(url.encode()).hexdigest()[:16])
    fs, root = fsspec.core.url_to_fs(url)
    os.makedirs(local, exist_ok=True)
    for name in files:
        src, dst = f"{root.rstrip('/')}/{name}", os.path.join(local, name)
        if os.path.isfile(dst):
            continue
        if not fs.exists(src):
            raise MissingFiles(f"checkpoint {url}: {name} not found there")
        fs.get(src, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
    return local


def _manifest_info(manifest: dict[str, Any], text_dim: int) -> dict[str, Any]:
    """Text encoder, VAE and latent layout recorded in a dataset manifest (data_prep.schema)."""
    info: dict[str, Any] = {}
    ae = manifest.get("autoencoder") or {}
    if ae.get("kind") == PIXEL or ae.get("model") == PIXEL:
        info["vae"] = PIXEL
    elif ae.get("model"):
        info["vae"] = ae["model"]
    for enc in manifest.get("text_encoders") or []:
        pooled = f"{enc.get('name', enc.get('kind'))}_pooled"
        spec = manifest.get("arrays", {}).get(pooled)
        if spec and list(spec.get("shape", [])) == [text_dim]:
            info["text_encoder"] = f"{enc['kind']}={enc['model']}"
            break
    return info


def _trainer_info(dataset: dict[str, Any]) -> dict[str, Any]:
    """Text encoder, VAE and latent scale recorded by the trainer (checkpoint meta "dataset")."""
    info: dict[str, Any] = {}
    ae = dataset.get("autoencoder") or {}
    if ae.get("kind") == PIXEL:
        info["vae"] = PIXEL
    elif ae.get("model"):
        info["vae"] = ae["model"]
    name = str(dataset.get("text_array", "")).removesuffix("_pooled")
    for enc in dataset.get("text_encoders") or []:
        if enc.get("name", enc.get("kind")) == name:
            info["text_encoder"] = f"{enc['kind']}={enc['model']}"
    if dataset.get("latent_scale"):  # the trainer multiplies raw latents by it
        info["latent_scale"] = 1.0 / float(dataset["latent_scale"])
    return info


def _load_checkpoint(path: str) -> tuple[Denoiser, dict[str, Any]]:
    """EMA weights of the latest complete trainer checkpoint in `path` (or `path`/checkpoints)."""
    from flax import nnx

    from at1_jax.checkpointing import checkpoints as checkpoint
    from at1_jax.train import config

    folder = path
    if not path.startswith("s3://") and os.path.isdir(os.path.join(path, "checkpoints")):
        folder = os.path.join(path, "checkpoints")  # a run folder
    try:
        ck = checkpoint.Checkpoints(folder, read_only=True, async_save=False)
        step = ck.latest_step()
        meta = ck.restore_meta(step) if step is not None else None
        ck.close()
    except checkpoint.CheckpointError:
        step = None
    if step is None:
        raise MissingFiles(
            f"checkpoint {path} not found or incomplete: it is neither an at1-jax weights "
            f"folder ({weights.CONFIG_FILE} + {weights.PARAMS_FILE}) nor a training run / "
            "checkpoint folder with a complete step. `python -m at1_jax.convert import "
            "TLD.pth DIR` makes a weights folder from TLD/AT-1 weights."
        )
    cfg = config.from_dict(meta["config"]).model
    graphdef, params, buffers = nnx.split(
        nnx.eval_shape(lambda: Denoiser(cfg, nnx.Rngs(0))), nnx.Param, ...
    )
    abstract = {"params": nnx.to_pure_dict(params), "buffers": nnx.to_pure_dict(buffers)}
    restored, _ = checkpoint.restore_params(folder, abstract)
    model = nnx.merge(graphdef, restored["params"], restored["buffers"])
    info = {"source": "checkpoint", "step": step, **_trainer_info(meta.get("dataset") or {})}
    return model, info


def load_denoiser(path: str, cache_dir: str = DEFAULT_CACHE) -> tuple[Denoiser, dict[str, Any]]:
    """The denoiser stored at `path` and what is known about how to use it.

    `path`: an at1-jax weights folder (config.json + params.safetensors, as written by
    `python -m at1_jax.convert` or at the end of training in RUN/weights), local or s3://,
    or a training run / checkpoint folder (the EMA weights of its latest complete step).
    A `manifest.json` (the training set's data_prep manifest) or `dataset.json` (what the
    trainer recorded) next to the weights tells which text encoder and VAE the model expects.
    info keys: source, path, text_encoder, vae, latent_scale, latent_shift (None = unknown).
    """
    info: dict[str, Any] = {
        "source": "weights",
        "path": path,
        "text_encoder": None,
        "vae": None,
        "latent_scale": None,
        "latent_shift": None,
    }
    local = path
    names = (weights.CONFIG_FILE, weights.PARAMS_FILE)
    if path.startswith("s3://"):
        try:
            local = _fetch_s3_folder(path, names, cache_dir)
        except MissingFiles:
            model, found = _load_checkpoint(path)
            return model, {**info, **found}
        for optional in ("manifest.json", weights.DATASET_FILE):
            try:
                _fetch_s3_folder(path, (optional,), cache_dir)
            except MissingFiles:
                pass
    if not all(os.path.isfile(os.path.join(local, n)) for n in names):
        model, found = _load_checkpoint(path)
        return model, {**info, **found}
    model = weights.load(local)
    manifest_path = os.path.join(local, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            info.update(_manifest_info(json.load(f), model.cfg.text_dim))
    dataset_path = os.path.join(local, weights.DATASET_FILE)
    if os.path.isfile(dataset_path):
        with open(dataset_path) as f:
            info.update(_trainer_info(json.load(f)))
    return model, info


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


def _encode_to_cache(todo, kind, model, files, batch_size) -> None:
    # Lazy: the PyTorch side is only needed for prompts never seen before.
    from data_prep.decode_torch import prompt_encoder

    enc = prompt_encoder(kind, model)
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


@jax.jit
def _start_noise(seeds, shape_holder):
    """Per-image N(0, I) start noise, one PRNG stream per seed (batch-independent)."""
    keys = jax.vmap(jax.random.key)(seeds)
    return jax.vmap(lambda k: jax.random.normal(k, shape_holder.shape, jnp.float32))(keys)


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

    def latents(self, text_ND: np.ndarray, seeds: Sequence[int], sampler: SamplerConfig):
        """f32[N, C, H, W] x0 for N text vectors; the last batch is padded, not recompiled."""
        run, b, c = self._run(sampler), self.batch_size, self.cfg
        holder = jnp.zeros((c.latent_channels, c.latent_size, c.latent_size), jnp.float32)
        out = []
        for i in range(0, len(seeds), b):
            n = min(b, len(seeds) - i)
            text = np.zeros((b, text_ND.shape[1]), np.float32)
            text[:n] = text_ND[i : i + n]
            s = np.zeros(b, np.uint32)
            s[:n] = np.asarray(seeds[i : i + n], np.int64).astype(np.uint32)
            x0 = run(jnp.asarray(text), _start_noise(jnp.asarray(s), holder), self.state)
            out.append(np.asarray(x0)[:n])
        return np.concatenate(out)


# ----------------------------------------------------------------------------- decode


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """How model latents become pixels: raw VAE latent = x0 · latent_scale + latent_shift."""

    mode: str  # jax | torch | none
    vae: str  # hub id, folder, or "pixel"
    latent_scale: float
    latent_shift: float


def resolve_decode(
    info: dict[str, Any], channels: int, decode: str, vae: str | None, scale: float | None
) -> DecodeSpec:
    """The checkpoint's VAE and latent scaling unless overridden on the command line."""
    vae = vae or info.get("vae") or (PIXEL if channels == 3 else DEFAULT_VAE)
    if vae == PIXEL:
        if channels != 3:
            raise ValueError(f"a pixel-space model has 3 latent channels, this one has {channels}")
        return DecodeSpec(decode if decode == "none" else PIXEL, PIXEL, 1.0, 0.0)
    if scale is None:
        scale = info.get("latent_scale") or REFERENCE_LATENT_SCALE
    return DecodeSpec(decode, vae, float(scale), float(info.get("latent_shift") or 0.0))


def require_decoder(spec: DecodeSpec) -> None:
    """Raises MissingFiles if the VAE weights are not available offline."""
    if spec.mode in ("jax", "torch"):
        require_model("VAE", "--vae", spec.vae, VAE_FILES)


def make_decoder(spec: DecodeSpec, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """x0 latents (N, C, h, w) → uint8 NHWC images, batched (loads the VAE once)."""
    if spec.mode == PIXEL:
        return lambda x0: (
            np.round(np.clip(x0 / 2 + 0.5, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
        )
    if spec.mode == "none":
        return lambda x0: images.to_uint8(images.latents_to_images(x0))
    if spec.mode == "torch":
        from data_prep.decode_torch import TorchDecoder  # lazy: PyTorch only when asked for

        dec = TorchDecoder(spec.vae)
        return lambda x0: dec.decode(
            (x0 * spec.latent_scale + spec.latent_shift).astype(np.float32), batch_size
        )
    from at1_jax.decode.vae import load_vae_decoder

    vae, _ = load_vae_decoder(spec.vae)

    def decode(x0):
        out = []
        for i in range(0, len(x0), batch_size):
            z = np.zeros((batch_size, *x0.shape[1:]), np.float32)
            n = min(batch_size, len(x0) - i)
            z[:n] = x0[i : i + n] * spec.latent_scale + spec.latent_shift
            out.append(np.asarray(vae.decode_to_images(jnp.asarray(z), uint8=True))[:n])
        return np.concatenate(out)

    return decode


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
        self.model, self.info = load_denoiser(checkpoint, cache_dir)
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
        self, prompts: Sequence[str], seeds: Sequence[int], sampler: SamplerConfig
    ) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 NHWC images, f32 x0 latents) for prompts[i] from the noise of seeds[i]."""
        text = self.embed(prompts)
        t0 = time.perf_counter()
        x0 = self.denoising.latents(text, seeds, sampler)
        t1 = time.perf_counter()
        if self._decoder is None:
            self._decoder = make_decoder(self.decode_spec, self.batch_size)
        imgs = self._decoder(x0)
        self.timing["denoise_s"] += t1 - t0
        self.timing["decode_s"] += time.perf_counter() - t1
        return imgs, x0
