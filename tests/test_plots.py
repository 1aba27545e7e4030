"""The run's curves PNG: smoothed training loss, validation loss, learning rate."""

import json

import numpy as np
import pytest
from PIL import Image

from at1_jax.train import plots


def _write(run_dir, rows, torn_tail=""):
    with open(run_dir / plots.SCALARS_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(torn_tail)


def test_smoothing_is_a_bias_corrected_ema():
    assert plots.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # flat start
    w = plots.SMOOTHING
    expected = ((1 - w) * w * 1.0 + (1 - w) * 3.0) / (1 - w**2)
    assert plots.smooth([1.0, 3.0])[1] == pytest.approx(expected)


def test_plot_has_all_curves_and_survives_a_torn_line(tmp_path):
    rows = [
        {"step": s, "loss": 1.0 / s, "lr": 1e-4 * min(1, s / 10), "grad_norm": 1.0}
        for s in range(1, 41)
    ]
    rows[19]["val_loss"] = 0.06
    rows[39]["val_loss"] = 0.03
    rows[5]["loss"] = float("nan")  # a non-finite point is left out, not drawn
    _write(tmp_path, rows, torn_tail='{"step": 41, "lo')
    assert len(plots.read_scalars(str(tmp_path))) == 40
    path = plots.write_plot(str(tmp_path), "demo run")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape == (600, 800, 3)
    orange = (np.abs(img - [255, 127, 14]).sum(axis=-1) < 40).sum()  # validation points
    green = (np.abs(img - [44, 160, 44]).sum(axis=-1) < 40).sum()  # learning rate
    assert orange > 20 and green > 20
    assert not list(tmp_path.glob("*.tmp.png"))


def test_nothing_logged_means_no_plot(tmp_path):
    assert plots.write_plot(str(tmp_path), "t") is None
    _write(tmp_path, [{"step": 1, "lr": 1e-4}])
    assert plots.write_plot(str(tmp_path), "t") is None
