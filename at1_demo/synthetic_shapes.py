"""A synthetic captioned image set: coloured shapes at named positions on coloured grounds.

    python -m at1_demo.synthetic_shapes OUT --num 4000 --size 32 --held-out 48 --validation 48

Writes OUT/images/{key}.png with {key}.txt captions and {key}.json attributes (license
cc0), and two sets of attribute combinations that never appear in the images:
OUT/held_out.{jsonl,txt} for testing generation on prompts the model has not seen (scored
once), and OUT/validation.{jsonl,txt} for choosing generation settings without looking at
the test prompts. Pure PIL/NumPy (no torch), so the trainer side can import the vocabulary
to score prompt adherence.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.17, "large": 0.30}  # radius as a fraction of the image side
POSITIONS = {  # centre as fractions of (x, y)
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What one image shows; the caption is written from it."""

    size: str
    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return (
            f"a {self.size} {self.colour} {self.shape} at the {self.position} "
            f"on a {self.background} background"
        )


def all_attributes() -> list[Attributes]:
    """Every combination, foreground and background colours differing."""
    return [
        Attributes(size, colour, shape, pos, bg)
        for size, colour, shape, pos, bg in itertools.product(
            SIZES, COLOURS, SHAPES, POSITIONS, COLOURS
        )
        if colour != bg
    ]


def draw(a: Attributes, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Render one image; `rng` adds a little jitter of position and size."""
    img = Image.new("RGB", (size, size), COLOURS[a.background])
    cx, cy = (f * size for f in POSITIONS[a.position])
    r = SIZES[a.size] * size
    if rng is not None:
        cx, cy = cx + rng.uniform(-0.04, 0.04) * size, cy + rng.uniform(-0.04, 0.04) * size
        r *= rng.uniform(0.9, 1.1)
    fill = COLOURS[a.colour]
    d = ImageDraw.Draw(img)
    if a.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif a.shape == "square":
        s = r * math.sqrt(math.pi) / 2  # same area as the circle
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        h = r * 1.3
        d.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=fill)
    return img


def split(
    held_out: int, seed: int, validation: int = 0
) -> tuple[list[Attributes], list[Attributes], list[Attributes]]:
    """(training, held-out, validation combinations), disjoint, chosen from the seed."""
    combos = all_attributes()
    if held_out + validation >= len(combos):
        raise ValueError(
            f"held_out + validation = {held_out + validation} leaves no training combination "
            f"(there are {len(combos)})"
        )
    order = np.random.default_rng(seed).permutation(len(combos))
    # The held-out set is the first `held_out` of the permutation whatever `validation` is.
    held = sorted((combos[i] for i in order[:held_out]), key=lambda a: a.caption)
    val = sorted(
        (combos[i] for i in order[held_out : held_out + validation]), key=lambda a: a.caption
    )
    train = [combos[i] for i in sorted(order[held_out + validation :])]
    return train, held, val


def _write_prompts(out: str, name: str, combos: list[Attributes]) -> None:
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
        for a in combos:
            f.write(json.dumps({"caption": a.caption, **dataclasses.asdict(a)}) + "\n")
    with open(os.path.join(out, f"{name}.txt"), "w") as f:
        f.write("".join(a.caption + "\n" for a in combos))


def generate(
    out: str, num: int, size: int = 32, held_out: int = 48, seed: int = 0, validation: int = 48
) -> dict:
    """Write the image folder, held-out and validation prompts; returns counts."""
    train, held, val = split(held_out, seed, validation)
    images = os.path.join(out, "images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    picks = rng.integers(0, len(train), num)
    for i, k in enumerate(picks):
        a = train[k]
        key = f"shape{i:06d}"
        draw(a, size, rng).save(os.path.join(images, f"{key}.png"))
        with open(os.path.join(images, f"{key}.txt"), "w") as f:
            f.write(a.caption)
        meta = {**dataclasses.asdict(a), "license": "cc0", "url": f"synthetic://shapes/{key}"}
        with open(os.path.join(images, f"{key}.json"), "w") as f:
            json.dump(meta, f)
    _write_prompts(out, "held_out", held)
    _write_prompts(out, "validation", val)
    return {
        "images": num,
        "train_combinations": len(train),
        "held_out": len(held),
        "validation": len(val),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m at1_demo.synthetic_shapes", description=__doc__)
    p.add_argument("out")
    p.add_argument("--num-images", "--num", dest="num", type=int, default=4000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--held-out", type=int, default=48, help="test prompts, scored once")
    p.add_argument("--validation", type=int, default=48, help="prompts for choosing settings")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(generate(a.out, a.num, a.size, a.held_out, a.seed, a.validation)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
