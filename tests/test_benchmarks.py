"""Benchmarks run and report consistent figures (no timing assertions)."""

import dataclasses
import re
import threading
import time

import pytest

from at1_jax.bench import benchmarks as bench
from at1_jax.model import flops
from at1_jax.model.presets import PRESETS


@pytest.mark.parametrize("name", ["tld-tiny", "at1"])
def test_compiled_flops_match_the_analytic_count(name):
    # XLA's cost analysis does not see inside a custom call: the depthwise conv as XLA ops.
    cfg = dataclasses.replace(PRESETS[name], depthwise="shift")
    r = bench.bench_model(cfg, batch=2, steps=0, time_it=False)
    # XLA also counts elementwise ops (norms, GELU, softmax) that the matmul count leaves out.
    assert 1.0 <= r["flops_per_image"] / r["analytic_flops_per_image"] < 1.25


@pytest.mark.slow
def test_model_and_train_benchmarks_print_figures(capsys, tmp_path):
    assert bench.main(["model", "--presets", "tld-tiny", "--batch", "2", "--steps", "1"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tld-tiny"))
    assert float(line.split()[1]) > 0  # images/s
    args = ["train", "--preset", "tld-tiny", "--batch", "4", "--fsdp", "2", "--steps", "2"]
    assert bench.main([*args, "--profile", str(tmp_path / "trace")]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "model TFLOP/s" in out and "x4" in out
    assert "this process: CPU" in out and "MiB per device, allocated every step" in out
    # The profile's table: the 4 devices' kernels, the step's matrix products among them.
    table = out[out.index("kernel kind") :].splitlines()
    dots = [ln for ln in table if "[dot]" in ln]
    assert dots and all(float(ln.split()[-1]) >= 4 for ln in dots)  # per step, 4 devices
    assert table[-1].startswith("all kernels, all threads") and float(table[-1].split()[-1]) > 0
    assert list((tmp_path / "trace").glob("**/*.xplane.pb"))  # for TensorBoard/XProf


@pytest.mark.slow
def test_train_benchmark_counts_every_device():
    from at1_jax.train.config import DataConfig, MeshConfig, TrainConfig

    model = dataclasses.replace(PRESETS["tld-tiny"], latent_size=8, depth=1)
    cfg = TrainConfig(model=model, data=DataConfig(path="x", batch_size=8), mesh=MeshConfig(data=4))
    r = bench.bench_train(cfg, steps=1)
    assert r["cpu_s_per_step"] > 0 and 0 < r["temp_gib"] < 1
    per_image = bench.bench_model(model, batch=8, steps=0, time_it=False)["flops_per_image"]
    # The 4 devices' shares add up to at least the one-device fwd+bwd count; above it by the
    # optimizer/EMA, which every device repeats on replicated weights (~25% for this tiny
    # model with data=4). Counting one device only would give ~0.3.
    assert 1.0 <= r["hardware_flops"] / (8 * per_image) < 1.35
    assert r["model_flops"] == 8 * flops.analytic_train_flops(model)


@pytest.mark.slow
def test_train_benchmark_times_each_window_only_when_its_turn_comes(capsys, tmp_path):
    from at1_jax.train.config import DataConfig, MeshConfig, TrainConfig

    model = dataclasses.replace(PRESETS["tld-tiny"], latent_size=8, depth=1)
    cfg = TrainConfig(model=model, data=DataConfig(path="x", batch_size=8), mesh=MeshConfig(data=4))
    result, out = {}, []

    def bench_run():
        result.update(bench.bench_train(cfg, steps=2, windows=2, turn_dir=str(tmp_path)))

    def printed(text, timeout_s=120.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out.append(capsys.readouterr().out)
            if text in "".join(out):
                return "".join(out)
            time.sleep(0.05)
        pytest.fail(f"{text!r} not printed in {timeout_s} s: {''.join(out)!r}")

    thread = threading.Thread(target=bench_run)
    thread.start()
    try:
        printed("waiting for window 0\n")
        time.sleep(1.0)  # ~100 steps' time: it would have timed window 0 by now
        assert "window 0:" not in printed("waiting for window 0\n") and thread.is_alive()
        (tmp_path / "go-0").touch()
        text = printed("waiting for window 1\n")
        assert "window 1:" not in text
    finally:
        for i in range(2):  # whatever happened, let the thread finish
            (tmp_path / f"go-{i}").touch()
        thread.join(timeout=120)
    assert not thread.is_alive()
    text = printed("window 1:")
    lines = re.findall(r"^window (\d): step ([\d.]+) s \| CPU ([\d.]+) s/step$", text, re.M)
    assert [i for i, _, _ in lines] == ["0", "1"], text
    # The run's figures are the windows' means, and what the lines printed.
    windows = result["windows"]
    assert [(f"{s:.4f}", f"{c:.4f}") for s, c in windows] == [(s, c) for _, s, c in lines]
    assert result["step_s"] == pytest.approx(sum(s for s, _ in windows) / 2, rel=1e-12)
    assert result["cpu_s_per_step"] == pytest.approx(sum(c for _, c in windows) / 2, rel=1e-12)
    assert all(s > 0 and c > 0 for s, c in windows)


@pytest.mark.parametrize(
    "args,message",
    [
        # The 4 test devices stand in for the one of a plain CPU: 3 divides neither.
        (["--fsdp", "3"], "error: --data -1 --fsdp 3 --tensor 1: mesh: 4 devices are not"),
        (["--data", "2", "--fsdp", "4"], "must equal the 4 available devices"),
        (["--fsdp", "2", "--batch", "6"], "--batch 6 must be a multiple of the data-parallel"),
        (["--preset", "nope"], "error: unknown model preset 'nope'"),
        (["--windows", "0"], "error: --windows 0 and --steps 1 must be >= 1"),
    ],
)
def test_train_benchmark_names_a_mesh_or_batch_that_does_not_fit(capsys, args, message):
    assert bench.main(["train", "--preset", "tld-tiny", "--steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
