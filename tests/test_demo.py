"""The built-in default job end to end, at a tiny scale (the full run is `make demo`)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.timeout(1000)  # above the 900 s the test gives the demo itself
def test_demo_runs_every_stage_and_reports_adherence(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "at1_demo", "--out", str(out), "--num-images", "96"]
    proc = subprocess.run(
        [*cmd, "--steps", "4"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "adherence.json").read_text())
    # The scorer reads the training images back almost perfectly, whatever the model learnt.
    assert report["training_images"]["mean"] > 0.95
    assert report["num_generated"] == 2 * 48  # 48 held-out prompts, 2 images each
    assert set(report["timings_s"]) == {"data", "prep", "train", "generate", "evaluate", "total"}
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["autoencoder"]["kind"] == "pixel" and manifest["num_samples"] == 96
    assert (out / "generated" / "grid.png").is_file()
    assert (out / "run" / "weights" / "params.safetensors").is_file()
    assert "prompt adherence" in proc.stdout and str(out / "generated") in proc.stdout
