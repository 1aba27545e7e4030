"""Benchmarks run and report consistent figures (no timing assertions)."""

import dataclasses

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


@pytest.mark.parametrize(
    "args,message",
    [
        # The 4 test devices stand in for the one of a plain CPU: 3 divides neither.
        (["--fsdp", "3"], "error: --data -1 --fsdp 3 --tensor 1: mesh: 4 devices are not"),
        (["--data", "2", "--fsdp", "4"], "must equal the 4 available devices"),
        (["--fsdp", "2", "--batch", "6"], "--batch 6 must be a multiple of the data-parallel"),
        (["--preset", "nope"], "error: unknown model preset 'nope'"),
    ],
)
def test_train_benchmark_names_a_mesh_or_batch_that_does_not_fit(capsys, args, message):
    assert bench.main(["train", "--preset", "tld-tiny", "--steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
