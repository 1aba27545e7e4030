"""model.dtype="auto": bfloat16 only where the hardware has fast bfloat16 dot products."""

import jax
import pytest

from at1_jax.model import hardware
from at1_jax.model.denoiser import DenoiserConfig


@pytest.mark.parametrize(
    "machine,flags,want",
    [
        ("x86_64", {"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
        ("x86_64", {"avx2", "amx_bf16", "amx_tile"}, "bfloat16"),
        ("x86_64", {"avx2", "avx512f"}, "float32"),  # bf16 there is converted to float32
        ("aarch64", {"bf16"}, "float32"),
    ],
)
def test_auto_on_cpu_follows_the_bf16_dot_product_flags(machine, flags, want, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert hardware.resolve_dtype("auto") == want
    assert DenoiserConfig(dtype="auto").compute_dtype == want
    assert hardware.resolve_dtype("float32") == "float32"  # an explicit dtype stays


@pytest.mark.parametrize("cc,want", [("9.0", "bfloat16"), ("8.0", "bfloat16"), ("7.0", "float32")])
def test_auto_on_gpu_needs_compute_capability_8(cc, want, monkeypatch):
    class Gpu:
        compute_capability = cc

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [Gpu()])
    dtype, why = hardware.auto_dtype_reason()
    assert dtype == want and cc in why


def test_cpu_flags_reads_this_machines_cpuinfo():
    flags = hardware.cpu_flags()
    # Every x86-64 Linux CPU reports sse2; other machines may report nothing.
    assert "sse2" in flags or not flags


def test_training_refuses_auto_when_hosts_would_differ(monkeypatch):
    from at1_jax.train import config, distributed, run_setup

    cfg = config.TrainConfig(model=DenoiserConfig(dtype="auto"))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert run_setup.resolve_numerics(cfg).model.dtype == "bfloat16"
    # Process 1 of two has no bf16 dot products: one program cannot mix the two dtypes.
    monkeypatch.setattr(distributed, "allgather_rows", lambda row: [row, [1, row[1]]])
    with pytest.raises(config.ConfigError, match="means float32 on some hosts, bfloat16 on others"):
        run_setup.resolve_numerics(cfg)
    explicit = config.TrainConfig(model=DenoiserConfig(dtype="float32"))
    monkeypatch.setattr(distributed, "allgather_rows", lambda row: [row])
    assert run_setup.resolve_numerics(explicit) is explicit


def test_training_refuses_depthwise_auto_when_hosts_would_differ(monkeypatch):
    from at1_jax.model.denoiser import DEPTHWISE
    from at1_jax.train import config, distributed, run_setup

    cfg = config.TrainConfig(model=DenoiserConfig(dtype="float32", depthwise="auto"))
    monkeypatch.setattr(run_setup, "auto_impl", lambda: "native")
    monkeypatch.setattr(distributed, "allgather_rows", lambda row: [row])
    # Resolved for the check, kept "auto" in the config (the weights stay portable).
    assert run_setup.resolve_numerics(cfg) is cfg
    # Process 1 could not build the kernel: its program would differ from process 0's.
    shift = DEPTHWISE.index("shift")
    monkeypatch.setattr(distributed, "allgather_rows", lambda row: [row, [row[0], shift]])
    with pytest.raises(config.ConfigError, match="means shift on some hosts, native on others"):
        run_setup.resolve_numerics(cfg)
    pinned = config.TrainConfig(model=DenoiserConfig(dtype="float32", depthwise="shift"))
    assert run_setup.resolve_numerics(pinned) is pinned


def test_training_refuses_native_depthwise_where_it_cannot_run(monkeypatch):
    from at1_jax.model import depthwise_native
    from at1_jax.train import config, run_setup

    cfg = config.TrainConfig(model=DenoiserConfig(dtype="float32", depthwise="native"))
    assert run_setup.resolve_numerics(cfg) is cfg  # it builds on this machine
    monkeypatch.setattr(depthwise_native, "unavailable_reason", lambda: "no C++ compiler")
    with pytest.raises(
        config.ConfigError, match=r"depthwise=.native.: no C\+\+ compiler: pass .*depthwise=auto"
    ):
        run_setup.resolve_numerics(cfg)
