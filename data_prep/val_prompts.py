"""Validation prompts for sample grids: a built-in list or one prompt per line of a file."""

from __future__ import annotations

from at1_io import storage

BUILTIN = (
    "a photograph of a red fox sitting in fresh snow",
    "a bowl of ramen with a soft-boiled egg, top view",
    "an oil painting of a lighthouse on a cliff during a storm",
    "a watercolor sketch of a city street in the rain",
    "a close-up photo of a hummingbird drinking from a flower",
    "a cozy reading nook with a window and a cat",
    "a mountain lake at sunrise with mist over the water",
    "a vintage red bicycle leaning against a brick wall",
    "an astronaut riding a horse on the moon",
    "a plate of colorful macarons on a marble table",
    "a black and white portrait of an old fisherman",
    "a futuristic city skyline at night with flying cars",
    "a field of sunflowers under a blue sky",
    "a wooden cabin in a snowy forest",
    "a macro photo of a dew drop on a green leaf",
    "a sailboat on a calm sea at sunset",
)


def load_prompts(path: str | None) -> list[str]:
    """Prompts from a UTF-8 file (blank lines and '#' comments skipped), else the built-ins."""
    if path is None:
        return list(BUILTIN)
    if not storage.exists(path):
        raise FileNotFoundError(f"--val-prompts file not found: {path}")
    text = storage.read_bytes(path).decode("utf-8")
    prompts = [" ".join(line.split()) for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--val-prompts file has no prompts: {path}")
    return prompts
