"""A PNG of the run's curves (training loss, validation loss, learning rate) for people
without TensorBoard: drawn from the run's scalars.jsonl at each checkpoint."""

from __future__ import annotations

import json
import math
import os

SCALARS_FILE = "scalars.jsonl"
PLOT_FILE = "curves.png"
SMOOTHING = 0.9  # exponential moving average of the training loss, as TensorBoard's slider


def read_scalars(run_dir: str) -> list[dict]:
    """The rows of scalars.jsonl (one JSON object per logged step); a torn last line is skipped."""
    path = os.path.join(run_dir, SCALARS_FILE)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill: the rest of the file is still good
    return rows


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (a flat start, like TensorBoard's)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [
        (r["step"], r[key])
        for r in rows
        if isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def write_plot(run_dir: str, title: str) -> str | None:
    """Writes run_dir/curves.png from the logged scalars; None when nothing is logged yet."""
    rows = read_scalars(run_dir)
    steps, loss = _series(rows, "loss")
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax_loss.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (raw)")
    ax_loss.plot(steps, smooth(loss), color="tab:blue", label=f"train (EMA {SMOOTHING})")
    val_steps, val = _series(rows, "val_loss")
    if val_steps:
        ax_loss.plot(val_steps, val, "o-", color="tab:orange", label="validation (x0 loss)")
    if min(loss + val) > 0:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title)
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(loc="upper right")
    lr_steps, lr = _series(rows, "lr")
    ax_lr.plot(lr_steps, lr, color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(True, alpha=0.3)
    path = os.path.join(run_dir, PLOT_FILE)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)  # a reader never sees half a PNG
    return path
