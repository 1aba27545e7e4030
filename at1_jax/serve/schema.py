"""The `POST /generate` request: fields, defaults (the sample CLI's), limits and error lines."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

from at1_jax.model.samplers import SAMPLERS, SamplerConfig

DEFAULTS = SamplerConfig()  # steps 15, guidance 6, dpmpp2m, seed 11: what sample uses
DEFAULT_NUM_IMAGES = 4  # sample's --num
MAX_PROMPT_CHARS = 2000  # text encoders truncate long before (CLIP: 77 tokens)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for (each a serve flag)."""

    max_images: int = 64
    max_steps: int = 100


def request_model(limits: Limits) -> type[BaseModel]:
    """The pydantic model of a generate request under `limits` (strict JSON types)."""

    def steps_within(steps: int) -> int:
        if steps > limits.max_steps:
            raise PydanticCustomError(
                "limit",
                "{steps} steps is more than this server's limit of {limit} (--max-steps)",
                {"steps": steps, "limit": limits.max_steps},
            )
        return steps

    def some_prompts(prompts: list[str]) -> list[str]:
        if not prompts:
            raise PydanticCustomError("no_prompts", "give at least one prompt")
        return prompts

    Prompt = Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS)
    ]

    class GenerateRequest(BaseModel):
        """Prompts and sampler settings; image k of every prompt starts from seed + k."""

        model_config = ConfigDict(extra="forbid", strict=True)

        prompts: Annotated[list[Prompt], AfterValidator(some_prompts)]
        num_images: int = Field(DEFAULT_NUM_IMAGES, ge=1, description="images per prompt")
        seed: int = Field(DEFAULTS.seed, ge=0, lt=2**32)
        steps: Annotated[int, AfterValidator(steps_within)] = Field(DEFAULTS.steps, ge=1)
        guidance: float = Field(DEFAULTS.guidance, ge=0, allow_inf_nan=False)
        sampler: Literal[SAMPLERS] = DEFAULTS.sampler

        @model_validator(mode="after")
        def _within_image_limit(self):
            n = len(self.prompts) * self.num_images
            if n > limits.max_images:
                raise PydanticCustomError(
                    "limit",
                    "{prompts} prompt(s) × {num} images = {n} images, more than this server's "
                    "limit of {limit} per request (--max-images)",
                    {
                        "prompts": len(self.prompts),
                        "num": self.num_images,
                        "n": n,
                        "limit": limits.max_images,
                    },
                )
            return self

        def sampler_config(self) -> SamplerConfig:
            return SamplerConfig(
                steps=self.steps, guidance=self.guidance, sampler=self.sampler, seed=self.seed
            )

    return GenerateRequest


def error_line(errors: list[dict]) -> str:
    """pydantic/FastAPI validation errors as one line: `field: message (got value)`; ..."""
    parts = []
    for e in errors:
        if e.get("type") == "json_invalid":
            parts.append(f"request body: not valid JSON ({e.get('ctx', {}).get('error', '')})")
            continue
        if e.get("type") in ("model_attributes_type", "model_type", "dict_type"):  # no object
            parts.append(
                "request body: send one JSON object with the header Content-Type: application/json"
            )
            continue
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        got = ""
        if loc and e.get("type") not in ("missing", "limit") and "input" in e:
            value = repr(e["input"])
            got = f" (got {value[:80]}{'…' if len(value) > 80 else ''})"
        parts.append(f"{loc or 'request'}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts)
