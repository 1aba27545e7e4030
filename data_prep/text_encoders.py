"""Text encoders: CLIP (pooled projected, optional tokens), T5 (tokens + mask), sentence."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from at1_io.schema import ArraySpec
from data_prep import model_refs
from data_prep.settings import TextEncoderSpec


def _has_normalize(model: str) -> bool:
    """True if a local sentence-transformers folder ends with a Normalize module."""
    path = os.path.join(model, "modules.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return any(m.get("type", "").endswith(".Normalize") for m in json.load(f))


class TextEncoder:
    """A loaded encoder that maps a list of strings to named fp16/uint8 arrays."""

    def __init__(
        self,
        spec: TextEncoderSpec,
        device: str,
        dtype: torch.dtype,
        clip_tokens: bool = False,
        max_length: int | None = None,
    ):
        from transformers import (
            AutoModel,
            AutoTokenizer,
            CLIPTextModelWithProjection,
            T5EncoderModel,
        )

        self.spec, self.device, self.dtype = spec, device, dtype
        self.clip_tokens = clip_tokens and spec.kind == "clip"
        cls = {"clip": CLIPTextModelWithProjection, "t5": T5EncoderModel, "sentence": AutoModel}
        cls = cls[spec.kind]
        named = "" if spec.name == spec.kind else f"{spec.name}:"
        flag = f"--text-encoder {named}{spec.kind}={spec.model}"
        try:
            model, loading = cls.from_pretrained(spec.model, dtype=dtype, output_loading_info=True)
            self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        except Exception as e:  # loaders raise many types; each means this model is unusable
            raise model_refs.load_error(
                flag, cls.__name__, spec.model, e, model_refs.KIND_HELP
            ) from e
        # Mean pooling never uses BERT's pooler: checkpoints saved without it are whole.
        unused = "pooler." if spec.kind == "sentence" else None
        missing = [k for k in loading["missing_keys"] if not (unused and k.startswith(unused))]
        model_refs.check_weights(
            flag,
            type(model).__name__,
            model.config.model_type,
            missing,
            len(model.state_dict()),
            model_refs.KIND_HELP,
        )
        self.model = model.to(device).eval()
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or 512
        if spec.kind == "t5":
            self.max_length = max_length or 120
        elif spec.kind == "clip":
            self.max_length = min(limit, max_length or 77)
        else:
            self.max_length = min(limit, max_length or 256)
        self.hidden = cfg.hidden_size if spec.kind != "t5" else cfg.d_model
        self.normalize = spec.kind == "sentence" and _has_normalize(spec.model)
        self.proj = getattr(cfg, "projection_dim", None)

    def arrays(self) -> dict[str, ArraySpec]:
        """Array specs this encoder writes, named ``{name}_pooled/_tokens/_mask``."""
        n, L = self.spec.name, self.max_length
        out = {}
        if self.spec.kind == "clip":
            out[f"{n}_pooled"] = ArraySpec(f"{n}_pooled", (self.proj,), "float16", "projected")
        if self.spec.kind == "sentence":
            out[f"{n}_pooled"] = ArraySpec(f"{n}_pooled", (self.hidden,), "float16", "mean pool")
        if self.spec.kind == "t5" or self.clip_tokens:
            out[f"{n}_tokens"] = ArraySpec(f"{n}_tokens", (L, self.hidden), "float16", "hidden")
            out[f"{n}_mask"] = ArraySpec(f"{n}_mask", (L,), "uint8", "1 = real token")
        return out

    def info(self) -> dict[str, Any]:
        """Manifest description."""
        return {
            "name": self.spec.name,
            "kind": self.spec.kind,
            "model": self.spec.model,
            "max_length": self.max_length,
            "normalize": self.normalize,
            "arrays": sorted(self.arrays()),
            "compute_dtype": str(self.dtype).removeprefix("torch."),
        }

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Encode a batch of strings to the arrays of ``arrays()`` (batched, first axis B)."""
        padding = "max_length" if self.spec.kind == "t5" or self.clip_tokens else True
        tok = self.tokenizer(
            texts,
            padding=padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        n = self.spec.name
        mask = tok["attention_mask"]
        out = self.model(input_ids=tok["input_ids"], attention_mask=mask)
        result = {}
        if self.spec.kind == "clip":
            result[f"{n}_pooled"] = out.text_embeds
        if self.spec.kind == "sentence":
            m = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            result[f"{n}_pooled"] = pooled
        if self.spec.kind == "t5" or self.clip_tokens:
            result[f"{n}_tokens"] = out.last_hidden_state
            result[f"{n}_mask"] = mask
        return {
            k: v.cpu().numpy().astype(np.uint8)
            if k.endswith("_mask")
            else v.float().cpu().numpy().astype(np.float16)
            for k, v in result.items()
        }
