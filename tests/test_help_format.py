"""Every command's --help shows its options' defaults."""

import argparse
import subprocess
import sys

import pytest

from at1_io.help_format import DefaultsHelpFormatter


def test_defaults_are_shown_with_or_without_help_text():
    p = argparse.ArgumentParser(prog="x", formatter_class=DefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--guidance", type=float, default=6.0, help="how strongly")
    p.add_argument("--port", type=int, default=8000, help="port; default %(default)s")
    p.add_argument("--quiet", action="store_true", help="a switch")
    p.add_argument("--vae", default=None, help="optional")
    p.add_argument("--text-encoder", default="", help="empty: the data set's")
    p.add_argument("--tags", action="append", default=[], help="repeatable")
    rows = [" ".join(line.split()) for line in p.format_help().splitlines() if "  --" in line]
    lines = {row.split()[0]: row for row in rows}
    assert lines["--steps"].endswith("STEPS (default: 15)")
    assert lines["--guidance"].endswith("how strongly (default: 6.0)")
    assert lines["--port"].endswith("port; default 8000")  # not twice
    for switch in ("--quiet", "--vae", "--tags", "--text-encoder"):  # no (default: None/""/…)
        assert "default" not in lines[switch], lines[switch]


@pytest.mark.parametrize(
    "module,expected",
    [
        ("at1_jax.sample", ["--steps STEPS", "(default: 15)", "(default: 6.0)", "(default: 11)"]),
        ("at1_jax.evaluate", ["(default: 6)", "caption i uses seed + i (as sample) (default: 11)"]),
        ("at1_jax.bench", ["python -m at1_jax.bench"]),
        (
            "at1_demo",
            ["--out OUT (default: outputs/demo)", "--num-images NUM_IMAGES (default: 4000)"],
        ),
        ("at1_demo.tune", ["(default: outputs/demo)", "seeds per prompt (default: 2)"]),
    ],
)
def test_commands_show_their_defaults(module, expected):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())  # argparse wraps help lines at the terminal width
    for want in expected:
        assert want in text, (want, out.stdout)
