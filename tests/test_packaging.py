"""A non-editable install works on its own: entry points, the demo's config, no repo files."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_install_runs_without_the_checkout(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), ROOT],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").iterdir()
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import os, at1_jax, at1_io, at1_demo.demo as demo\n"
        "from at1_jax.train import config\n"
        "assert at1_jax.__file__.startswith(os.environ['PYTHONPATH']), at1_jax.__file__\n"
        "cfg = config.load_file(demo.DEMO_CONFIG)\n"
        "from at1_jax.model.native import build\n"
        "assert build.SOURCE.is_file(), build.SOURCE  # the C++ kernel's source ships\n"
        "print(cfg.model.width, demo.DEMO_CONFIG)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[1].startswith(str(target))  # the config ships in the package
    for module in ("at1_jax.train", "at1_jax.sample", "at1_jax.evaluate", "at1_jax.convert",
                   "at1_jax.bench", "at1_jax.serve", "at1_demo", "data_prep.encode"):  # fmt: skip
        r = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0 and "usage" in r.stdout, (module, r.stderr[-2000:])
