"""All settings of an encode run, and which of them change the dataset's contents."""

from __future__ import annotations

import dataclasses
import re

from at1_io.constants import DEFAULT_TEXT_ENCODER, DEFAULT_VAE
from data_prep.images import DEFAULT_MAX_PIXELS
from data_prep.licenses import DEFAULT_ALLOWED, parse_allowed

# Torch-free on purpose: the CLI reports argument errors before torch is imported.
DEFAULT_CAPTIONER = "llava-hf/llava-1.5-7b-hf"
DEFAULT_PROMPT = "describe this image in a highly detailed manner"
CAPTION_MODES = ("off", "all", "missing", "both")
KINDS = ("clip", "t5", "sentence")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
    """One --text-encoder value: ``[name:]kind=model`` (name defaults to the kind)."""

    name: str
    kind: str
    model: str


def parse_spec(value: str) -> TextEncoderSpec:
    """Parse ``[name:]kind=model``, e.g. ``clip=openai/clip-vit-large-patch14``."""
    head, sep, model = value.partition("=")
    if not sep or not model:
        raise ValueError(f"--text-encoder {value!r}: expected [name:]kind=model")
    name, _, kind = head.rpartition(":")
    name = name or kind
    if kind not in KINDS:
        raise ValueError(f"--text-encoder {value!r}: kind must be one of {', '.join(KINDS)}")
    if not _NAME_RE.match(name):
        raise ValueError(f"--text-encoder {value!r}: name must match {_NAME_RE.pattern}")
    return TextEncoderSpec(name, kind, model)


# Content settings added after outputs were first written, with the value an output written
# before them had: resuming such an output with these values is no settings change.
ADDED_DEFAULTS = {"val_fraction": 0.0, "val_input": None}

# Settings that only change how fast or where a run goes, not what it writes.
RUNTIME_ONLY = (
    "output",
    "num_workers",
    "worker_index",
    "batch_size",
    "caption_batch_size",
    "decode_threads",
    "device",
    "progress",
)


@dataclasses.dataclass
class EncodeSettings:
    """Settings of ``python -m data_prep.encode`` (see its --help for each)."""

    input: str
    output: str
    input_format: str = "auto"
    image_column: str | None = None
    caption_column: str = "caption"
    split: str = "train"
    tfds_data_dir: str | None = None
    resolution: int = 256
    min_size: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_size: int = 1000
    batch_size: int = 32
    vae: str = DEFAULT_VAE
    vae_subfolder: str | None = None
    latent: str = "mean_std"
    text_encoders: list[str] = dataclasses.field(default_factory=lambda: [DEFAULT_TEXT_ENCODER])
    clip_tokens: bool = False
    text_max_length: int | None = None
    caption: str = "off"
    captioner: str = DEFAULT_CAPTIONER
    caption_prompt: str = DEFAULT_PROMPT
    caption_temperature: float = 0.2
    caption_max_new_tokens: int = 128
    caption_batch_size: int = 8
    licenses: str = ",".join(DEFAULT_ALLOWED)
    val_prompts: str | None = None
    val_fraction: float = 0.0
    val_input: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    num_workers: int | None = None
    worker_index: int | None = None
    decode_threads: int = 4
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError for any inconsistent setting, before anything is loaded."""
        if self.caption not in CAPTION_MODES:
            raise ValueError(f"--caption must be one of {CAPTION_MODES}")
        if self.latent not in ("mean_std", "sample"):
            raise ValueError("--latent must be mean_std or sample")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError("--dtype must be auto, fp32, bf16 or fp16")
        for n, v in (("--resolution", self.resolution), ("--shard-size", self.shard_size)):
            if v < 1:
                raise ValueError(f"{n} must be positive")
        if self.resolution % 8:
            raise ValueError("--resolution must be a multiple of 8")
        if self.batch_size < 1 or self.caption_batch_size < 1 or self.decode_threads < 1:
            raise ValueError("batch sizes and --decode-threads must be positive")
        parse_allowed(self.licenses)
        if not 0 <= self.val_fraction < 1:  # NaN fails too
            raise ValueError(
                f"--val-fraction {self.val_fraction}: must be at least 0 and below 1 "
                "(the share of input groups held out for validation)"
            )
        if self.val_fraction and self.val_input:
            raise ValueError(
                "--val-fraction and --val-input both choose the validation split: give one"
            )
        if self.val_input is not None and self.val_input.rstrip("/") == self.input.rstrip("/"):
            raise ValueError(
                f"--val-input {self.val_input} is the input itself: validation images must not "
                "be trained on; give another input, or hold out part of it with --val-fraction"
            )
        specs = [parse_spec(s) for s in self.text_encoders]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"--text-encoder names must differ (got {names}); use name:kind=model")

    @property
    def effective_min_size(self) -> int:
        """--min-size, defaulting to half the resolution (more upscaling looks blurry)."""
        return self.resolution // 2 if self.min_size is None else self.min_size

    def content_settings(self) -> dict:
        """Settings that decide the dataset contents (compared across reruns and workers)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in RUNTIME_ONLY}
