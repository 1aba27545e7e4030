"""The C++ depthwise conv + GELU kernels: values, gradients, shapes, sharding, build, fallback."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_depthwise import _gelu64, _numpy_reference

from at1_jax.model import depthwise, depthwise_native
from at1_jax.model.native import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference64(x, w, b):
    """gelu(conv + b) and its pre-activation, in float64."""
    a = _numpy_reference(x, w, b)
    return _gelu64(a), a


def _grads64(x, w, b, dy):
    """(dx, dw, db) of Σ gelu(conv(x) + b)·dy, in float64."""
    _, H, W, C = x.shape
    _, a = _reference64(x, w, b)
    pdf = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    da = dy * (0.5 * (1.0 + np.vectorize(math.erf)(a / math.sqrt(2.0))) + a * pdf)
    dap = np.pad(da, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dx = np.zeros_like(x)
    dw = np.zeros((3, 3, C))
    for i in range(3):
        for j in range(3):
            dx += dap[:, 2 - i : 2 - i + H, 2 - j : 2 - j + W, :] * w[i, j]
            dw[i, j] = (xp[:, i : i + H, j : j + W, :] * da).sum((0, 1, 2))
    return dx, dw, da.sum((0, 1, 2))


def _inputs(shape, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    C = shape[-1]
    x = jax.random.normal(k[0], shape).astype(dtype)
    w = 0.5 * jax.random.normal(k[1], (3, 3, C))
    b = 0.5 * jax.random.normal(k[2], (C,))
    dy = jax.random.normal(k[3], shape).astype(dtype)
    return x, w, b, dy


def _f64(*arrays):
    return [np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in arrays]


# Edge cases of the kernel's loops: one row or column (every tap but the centre is off the
# map), channels in blocks of 32 (vector registers), fewer than a block, and blocks with
# channels left over; one example and more examples than threads.
SHAPES = [(1, 1, 1, 3), (2, 1, 7, 5), (5, 3, 1, 17), (3, 4, 5, 45), (7, 8, 8, 64), (1, 2, 3, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_equal_the_float64_reference(shape):
    x, w, b, dy = _inputs(shape)
    y = depthwise_native.depthwise_conv3x3_gelu(x, w, b)
    want, _ = _reference64(*_f64(x, w, b))
    # ≤ 10 float32 terms of O(1) through GELU (slope ≤ 1.13) and a few-ulp erf: ~1e-6.
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)
    got = jax.vjp(depthwise_native.depthwise_conv3x3_gelu, x, w, b)[1](dy)
    for g, r in zip(got, _grads64(*_f64(x, w, b, dy)), strict=True):
        # dw, db sum up to B·H·W = 448 float32 products: relative error ~1e-6 of the terms.
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * scale)


def test_bfloat16_storage_rounds_once():
    x, w, b, dy = _inputs((4, 6, 5, 40), jnp.bfloat16, seed=1)  # a block of 32 and 8 more
    y = depthwise_native.depthwise_conv3x3_gelu(x, w, b)
    assert y.dtype == jnp.bfloat16
    want, _ = _reference64(*_f64(x, w, b))
    # float32 math, one rounding to bfloat16 at the end: half a bf16 ulp, ≤ 2^-8 relative
    # (8 significant bits).
    np.testing.assert_array_less(
        np.abs(np.asarray(y, np.float64) - want), 2**-8 * np.abs(want) + 1e-6
    )
    dx, dw, db = jax.vjp(depthwise_native.depthwise_conv3x3_gelu, x, w, b)[1](dy)
    assert (dx.dtype, dw.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    rdx, rdw, rdb = _grads64(*_f64(x, w, b, dy))
    np.testing.assert_array_less(
        np.abs(np.asarray(dx, np.float64) - rdx), 2**-8 * np.abs(rdx) + 1e-5
    )
    # dw and db stay float32 (the GELU gradient is not rounded to bf16 on the way).
    np.testing.assert_allclose(dw, rdw, rtol=0, atol=1e-5 * float(np.abs(rdw).max()))
    np.testing.assert_allclose(db, rdb, rtol=0, atol=1e-5 * float(np.abs(rdb).max()))


def test_split_batch_and_channels_run_locally_and_sum_like_one_device():
    x, w, b, dy = _inputs((8, 4, 4, 16), seed=2)
    mesh = jax.make_mesh((2, 2), ("data", "tensor"))
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None, "tensor")))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, None, "tensor")))

    def loss(x, w, b):
        return jnp.sum(depthwise_native.depthwise_conv3x3_gelu(x, w, b) * dy)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    value, grads = step(xs, ws, b)
    want_value, want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for g, r in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * float(jnp.abs(r).max()))
    assert grads[0].sharding.spec == P("data", None, None, "tensor")
    hlo = step.lower(xs, ws, b).compile().as_text()
    # Each device runs the kernels on its own quarter: 4 examples × 8 channels, no gathering.
    calls = [line for line in hlo.splitlines() if "custom_call_target=" in line]
    assert {depthwise_native.FORWARD, depthwise_native.BACKWARD} <= {
        line.split('custom_call_target="')[1].split('"')[0] for line in calls
    }
    assert all("[4,4,4,8]" in line for line in calls), calls
    assert "all-gather" not in hlo


def test_split_height_is_gathered_not_wrong():
    x, w, b, _ = _inputs((2, 8, 4, 8), seed=3)
    mesh = jax.make_mesh((4,), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "data")))
    y = jax.jit(depthwise_native.depthwise_conv3x3_gelu)(xs, w, b)
    np.testing.assert_allclose(y, depthwise_native.depthwise_conv3x3_gelu(x, w, b), atol=1e-6)


def test_auto_is_native_on_cpu_and_runs_inside_a_scan():
    assert depthwise.auto_impl() == "native"
    x, w, b, _ = _inputs((2, 4, 4, 8), seed=4)

    def body(h, _):
        return depthwise.depthwise_conv3x3_gelu(h, w, b, "auto"), None

    got, _ = jax.jit(lambda x: jax.lax.scan(body, x, None, length=3))(x)
    want = x
    for _ in range(3):
        want = depthwise.depthwise_conv3x3_gelu(want, w, b, "shift")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_library_is_cached_by_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("AT1_NATIVE_CACHE", str(tmp_path))
    path = build.build()
    assert path.parent == tmp_path and path.suffix == ".so"
    built = path.stat().st_mtime_ns
    assert build.build() == path and path.stat().st_mtime_ns == built  # cached: not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
    monkeypatch.setenv("CXX", "g++ -DAT1_OTHER")
    assert build.library_path() != path


def test_an_unwritable_cache_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("AT1_NATIVE_CACHE", str(blocker / "cache"))
    with pytest.raises(build.NativeBuildError, match=r"cannot write to .*file/cache: .*AT1_NATIVE"):
        build.build()


def test_a_failing_compiler_is_named_and_auto_falls_back_to_shift(tmp_path):
    env = {**os.environ, "AT1_NATIVE_CACHE": str(tmp_path), "CXX": "false --no-such-compiler"}
    code = (
        "import logging; logging.basicConfig()\n"
        "from at1_jax.model import depthwise, depthwise_native\n"
        "print(depthwise.auto_impl())\n"
        "import jax.numpy as jnp\n"
        "x = jnp.ones((1, 2, 2, 3))\n"
        "try:\n"
        "    depthwise.depthwise_conv3x3_gelu(x, jnp.ones((3, 3, 3)), jnp.ones(3), 'native')\n"
        "except RuntimeError as e:\n"
        "    print('error:', e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    first, second = run.stdout.splitlines()
    assert first == "shift"
    assert "depthwise 'auto' runs 'shift'" in run.stderr
    assert "false --no-such-compiler" in run.stderr  # the command that failed
    assert second.startswith("error: model.depthwise='native': ") and second.endswith("use 'shift'")
    assert list(tmp_path.iterdir()) == []  # nothing half-built left in the cache


def test_build_command_prints_the_library(tmp_path):
    env = {**os.environ, "AT1_NATIVE_CACHE": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "at1_jax.model.native.build"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    (built,) = tmp_path.iterdir()
    assert run.stdout.strip() == str(built)
    env["CXX"] = "false"
    run = subprocess.run(
        [sys.executable, "-m", "at1_jax.model.native.build"],
        env={**env, "AT1_NATIVE_CACHE": str(tmp_path / "other")},
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.startswith("at1_jax native kernels not built: false ")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_nan_input_spreads_to_its_neighbours_only(dtype):
    """The non-finite guard sees it: NaN reaches exactly the outputs whose taps read it."""
    x, w, b, _ = _inputs((1, 5, 5, 32), dtype, seed=5)
    x = x.at[0, 2, 3, 7].set(jnp.nan)
    y = np.asarray(depthwise_native.depthwise_conv3x3_gelu(x, w, b), np.float32)
    want = np.zeros(y.shape, bool)
    want[0, 1:4, 2:5, 7] = True
    np.testing.assert_array_equal(np.isnan(y), want)
