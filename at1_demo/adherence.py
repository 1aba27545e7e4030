"""Prompt adherence of synthetic-shape images, measured analytically (no learned model).

For each image: the background colour is the median of the border; the foreground is what
differs from it; its median colour, centroid, area and bounding-box fill ratio give the
colour, position, size and shape, each matched to the nearest named value.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from at1_demo.synthetic_shapes import COLOURS, POSITIONS, SIZES, Attributes

FIELDS = ("background", "colour", "shape", "position", "size")
_PALETTE = np.array(list(COLOURS.values()), np.float32)
_NAMES = list(COLOURS)
# Shapes are drawn with the area of the circle: fill of the bounding box tells them apart
# (triangle 0.5, circle π/4 ≈ 0.79, square 1): thresholds half-way.
_FILL_EDGES = ((0.64, "triangle"), (0.89, "circle"), (np.inf, "square"))
_SMALL, _LARGE = (np.pi * r * r for r in SIZES.values())
_AREA_EDGE = np.sqrt(_SMALL * _LARGE)  # geometric mid-point of the two areas
_MASK_DISTANCE = 60.0  # RGB distance (0-255) from the background that counts as shape


def _nearest_colour(rgb) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]


def analyse(image_HWC) -> dict[str, str | None]:
    """Attributes read off one image (floats in [0, 1] or uint8); None where no shape."""
    px = np.asarray(image_HWC, np.float32)
    if px.max() <= 1.0:
        px = px * 255.0
    h, w, _ = px.shape
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg = np.median(border, axis=0)
    mask = np.sqrt(((px - bg) ** 2).sum(-1)) > _MASK_DISTANCE
    out: dict[str, str | None] = {"background": _nearest_colour(bg)}
    if mask.sum() < 4:
        return {**out, "colour": None, "shape": None, "position": None, "size": None}
    out["colour"] = _nearest_colour(np.median(px[mask], axis=0))
    ys, xs = np.nonzero(mask)
    centre = np.array([xs.mean() / w, ys.mean() / h])
    anchors = np.array(list(POSITIONS.values()))
    out["position"] = list(POSITIONS)[int(np.argmin(((anchors - centre) ** 2).sum(-1)))]
    area = mask.sum() / (h * w)
    out["size"] = "small" if area < _AREA_EDGE else "large"
    bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / bbox
    out["shape"] = next(name for edge, name in _FILL_EDGES if fill < edge)
    return out


def score(images, attributes: list[Attributes]) -> dict[str, float]:
    """Accuracy per attribute and their mean ("all" counts images right on every one)."""
    hits = {f: [] for f in FIELDS}
    every = []
    for img, a in zip(images, attributes, strict=True):
        got = analyse(img)
        want = dataclasses.asdict(a)
        ok = [got[f] == want[f] for f in FIELDS]
        for f, o in zip(FIELDS, ok, strict=True):
            hits[f].append(o)
        every.append(all(ok))
    result = {f: float(np.mean(v)) for f, v in hits.items()}
    result["mean"] = float(np.mean([result[f] for f in FIELDS]))
    result["all"] = float(np.mean(every))
    return result


def chance() -> dict[str, float]:
    """Expected accuracy of a guess uniform over the named values."""
    n = {"background": len(COLOURS), "colour": len(COLOURS) - 1, "shape": 3}
    n.update(position=len(POSITIONS), size=len(SIZES))
    result = {f: 1.0 / n[f] for f in FIELDS}
    result["mean"] = float(np.mean(list(result.values())))
    return result
