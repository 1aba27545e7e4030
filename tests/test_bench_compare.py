"""tools/bench_compare.py: both sides run in their own process and the table says so."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "bench_compare.py"


@pytest.mark.torch
def test_one_round_of_each_side_prints_the_comparison(tmp_path):
    pytest.importorskip("torch")
    out_json = tmp_path / "r.json"
    # Rounds of ~1 s: over a one-step round of a few ms, getrusage's CPU time (tick samples
    # scaled and kept monotonic) once read 2.11 cores on this 2-core machine.
    args = ["--presets", "tld-tiny", "--batch", "4", "--rounds", "1", "--round-s", "1"]
    args += ["--jax-malloc", "glibc.malloc.hugetlb=1"]
    run = subprocess.run(
        [sys.executable, str(TOOL), *args, "--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout
    assert "preset=tld-tiny batch=4 rounds=1" in text
    from at1_jax.model.hardware import auto_dtype_reason

    dtype, why = auto_dtype_reason()  # the shipped configs' default, "auto"
    assert "at1_jax: jax " in text and f"compute {dtype} (auto: {why})" in text
    assert "malloc: glibc.malloc.hugetlb=1" in text
    assert "torch: torch " in text and "fp32 eager, malloc: glibc defaults" in text
    rows = {
        m["side"]: m
        for m in re.finditer(
            r"^  (?P<side>at1_jax|torch) +(?P<lo>[\d.]+) +(?P<med>[\d.]+) +(?P<hi>[\d.]+) +"
            r"(?P<rss>[\d.]+) +(?P<steps>\d+) +(?P<setup>[\d.]+) +(?P<loss>[\d.]+) +"
            r"(?P<cores>[\d.]+)$",
            text,
            re.M,
        )
    }
    assert set(rows) == {"at1_jax", "torch"}, text
    for row in rows.values():
        assert 0 < float(row["lo"]) <= float(row["med"]) <= float(row["hi"])
        assert float(row["rss"]) > 0.1 and int(row["steps"]) >= 1
        assert 0 < float(row["loss"]) < 10  # an x0 MSE of unit-variance latents
        # CPU time over wall time while stepping: some, at most every core (with rounding).
        assert 0 < float(row["cores"]) <= os.cpu_count() + 0.05
    assert re.search(r"ratio at1_jax/torch: img/s [\d.]+x .* peak RSS [\d.]+x", text)
    (result,) = json.loads(out_json.read_text())
    ratio = result["img_per_s"]["at1_jax"][0] / result["img_per_s"]["torch"][0]
    assert result["ratio_median"] == pytest.approx(ratio)
    # Each side reports its own process's peak: two different numbers, not one shared figure.
    assert result["peak_rss_gib"]["at1_jax"] != result["peak_rss_gib"]["torch"]


def test_bad_arguments_are_one_line_errors():
    for args, message in (
        (["--rounds", "0"], "--rounds and --batch must be >= 1"),
        (["--rewarm", "-1"], "--rewarm >= 0"),
        (["--xla-option", "no_equals_sign"], "--xla-option takes NAME=VALUE"),
        (["--presets", "at2"], "unknown model preset 'at2'"),
    ):
        run = subprocess.run(
            [sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=ROOT
        )
        assert run.returncode == 2, (args, run.stderr)
        assert message in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


def test_steps_run_one_deep_as_the_trainer_runs_them():
    """Step k+1 is dispatched before step k's loss is read, and every loss is read."""
    sys.path.insert(0, str(TOOL.parent))
    try:
        import bench_compare
    finally:
        sys.path.pop(0)
    events = []

    def start():
        k = sum(e[0] == "start" for e in events)
        events.append(("start", k))

        def finish():
            events.append(("finish", k))
            return float(k)

        return finish

    assert bench_compare._run(start, 3) == 2.0
    assert events == [
        ("start", 0),
        ("start", 1),
        ("finish", 0),
        ("start", 2),
        ("finish", 1),
        ("finish", 2),
    ]
    assert bench_compare._run(start, 0) is None
