"""The one door from at1_jax to PyTorch: prompt encoding, the diffusers VAE, CLIP score.

Everything behind it lives in data_prep (which imports torch); this module imports it only
when called, so the core (model, training, sampling from cached embeddings) runs without
torch installed, and a missing extra is one clear error instead of a traceback.
"""

from __future__ import annotations

EXTRA = "pip install 'at1-jax[data]'"
PROMPT_HINT = ", or use prompts whose embeddings are already in the cache (--cache-dir)"
_TORCH_SIDE = {"torch", "transformers", "diffusers", "tokenizers"}


class MissingExtra(RuntimeError):
    """A feature needs the PyTorch extra, which is not installed; the message says so."""


def _missing(e: ImportError, what: str, hint: str = "") -> Exception:
    missing = (e.name or "").split(".")[0]
    if missing not in _TORCH_SIDE:
        return e
    return MissingExtra(f"{what} needs PyTorch ({missing} is not installed): {EXTRA}{hint}")


def require(what: str) -> None:
    """Raises MissingExtra now, before any work, if `what` will need PyTorch and it is absent."""
    try:
        from data_prep import decode_torch  # noqa: F401
    except ImportError as e:
        raise _missing(e, what, PROMPT_HINT if what == "prompt encoding" else "") from None


def prompt_encoder(kind: str, model: str):
    """data_prep's pooled text encoder (fp32, CPU): `.encode(texts)` → {f"{kind}_pooled": …}."""
    try:
        from data_prep import decode_torch
    except ImportError as e:
        raise _missing(e, "prompt encoding", PROMPT_HINT) from None
    return decode_torch.prompt_encoder(kind, model)


def torch_vae_decoder(model: str):
    """diffusers' AutoencoderKL decoder: `.decode(raw_latents, batch_size)` → uint8 NHWC."""
    try:
        from data_prep import decode_torch
    except ImportError as e:
        raise _missing(e, "--decode torch") from None
    return decode_torch.TorchDecoder(model)


def clip_embedder(model: str):
    """A CLIP model for the CLIP score: `.image_embeds(uint8 NHWC)`, `.text_embeds(texts)`."""
    try:
        from data_prep import clip_score
    except ImportError as e:
        raise _missing(e, "the CLIP score") from None
    return clip_score.ClipEmbedder(model)
