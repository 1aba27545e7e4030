"""Depthwise 3×3 conv formulations, alone and fused with GELU: equal values and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at1_jax.model.depthwise import (
    band_rows,
    depthwise_conv3x3,
    depthwise_conv3x3_gelu,
    gelu,
    gelu_grad,
    kernel_grad,
)


def _numpy_reference(x, w, b):
    _B, H, W, _C = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.broadcast_to(b, x.shape).astype(np.float64).copy()
    for i in range(3):
        for j in range(3):
            out += xp[:, i : i + H, j : j + W, :] * w[i, j]
    return out


def _args(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 5, 6, 8), dtype)
    w = jax.random.normal(k[1], (3, 3, 8), dtype)
    b = jax.random.normal(k[2], (8,), dtype)
    return x, w, b


@pytest.mark.parametrize("impl", ["conv", "shift"])
def test_matches_numpy_reference(impl):
    x, w, b = _args()
    ref = _numpy_reference(*(np.asarray(a, np.float64) for a in (x, w, b)))
    # 10 fp32 terms of O(1): a few ulps of |out| ≈ 1e-6.
    np.testing.assert_allclose(depthwise_conv3x3(x, w, b, impl), ref, atol=1e-5)


def test_shift_gradients_equal_conv_gradients():
    x, w, b = _args()
    dy = jax.random.normal(jax.random.key(1), x.shape)

    def grads(impl):
        def f(x, w, b):
            return jnp.sum(jax.jit(depthwise_conv3x3, static_argnums=3)(x, w, b, impl) * dy)

        return jax.grad(f, argnums=(0, 1, 2))(x, w, b)

    for a, c in zip(grads("shift"), grads("conv"), strict=True):
        # dw sums 60 products per entry: fp32 reassociation stays ~1e-6 relative.
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def test_shift_gradients_keep_input_dtypes_in_bf16():
    x, w, b = _args(jnp.bfloat16)
    gx, gw, gb = jax.grad(
        lambda x, w, b: jnp.sum(depthwise_conv3x3(x, w, b, "shift").astype(jnp.float32)),
        argnums=(0, 1, 2),
    )(x, w, b)
    assert (gx.dtype, gw.dtype, gb.dtype) == (jnp.bfloat16,) * 3
    # d/db of Σy is the number of positions: 2·5·6 = 60, exact in bf16.
    np.testing.assert_array_equal(np.asarray(gb, np.float32), 60.0)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match=r"one of .*'native'\), got 'fft'"):
        depthwise_conv3x3(*_args(), "fft")


def _gelu64(a):
    return 0.5 * a * (1.0 + np.vectorize(math.erf)(a / math.sqrt(2.0)))


@pytest.mark.parametrize("impl", ["conv", "shift", "native"])
def test_fused_gelu_matches_numpy_reference(impl):
    x, w, b = _args()
    ref = _gelu64(_numpy_reference(*(np.asarray(a, np.float64) for a in (x, w, b))))
    # The conv's ~1e-6 error passes through GELU (slope ≤ 1.13) plus erf's own few ulps.
    np.testing.assert_allclose(depthwise_conv3x3_gelu(x, w, b, impl), ref, atol=2e-5)


@pytest.mark.parametrize("impl", ["shift", "native"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_gelu_vjp_equals_autodiff_of_the_unfused_ops(dtype, impl):
    """The hand-written VJP (taps recomputed, GELU' in closed form) against jax.grad of
    gelu(grouped conv) in float32, for float32 and bf16 activations."""
    x, w, b = _args()
    x = x.astype(dtype)
    dy = jax.random.normal(jax.random.key(2), x.shape)

    def fused(x, w, b):
        return jnp.sum(depthwise_conv3x3_gelu(x, w, b, impl).astype(jnp.float32) * dy)

    def unfused(x, w, b):
        y = depthwise_conv3x3(x.astype(jnp.float32), w, b, "conv")
        return jnp.sum(jax.nn.gelu(y, approximate=False) * dy)

    got = jax.grad(fused, argnums=(0, 1, 2))(x, w, b)
    want = jax.grad(unfused, argnums=(0, 1, 2))(x, w, b)
    assert [g.dtype for g in got] == [dtype, jnp.float32, jnp.float32]
    for g, r in zip(got, want, strict=True):
        scale = float(jnp.abs(r).max())
        if dtype == jnp.float32:
            # Same sums in another order: fp32 reassociation over ≤ 60 terms, ~1e-6 relative.
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * scale)
        else:
            # The GELU gradient is rounded to bf16 (≤ 2^-8 relative) before the taps sum it,
            # and dx is rounded again: measured 3.5e-3 of the largest entry, bound 1e-2.
            np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=0, atol=1e-2 * scale)


@pytest.mark.parametrize("rows", [1, 2, 3, 6])
def test_kernel_gradient_by_row_bands_equals_the_float64_sum(rows):
    k = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(k[0], (2, 6, 5, 8))
    dy = jax.random.normal(k[1], (2, 6, 5, 8))
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    dy64 = np.asarray(dy, np.float64)
    want = np.stack(
        [(xp[:, i : i + 6, j : j + 5, :] * dy64).sum((0, 1, 2)) for i in range(3) for j in range(3)]
    ).reshape(3, 3, 8)
    # 60 products of O(1) per entry summed in float32: ~1e-6 relative to the sum's terms.
    np.testing.assert_allclose(kernel_grad(x, dy, rows), want, rtol=0, atol=1e-5)


def test_kernel_gradient_bands_must_divide_the_height():
    x = jnp.zeros((1, 6, 5, 8))
    with pytest.raises(ValueError, match="divide the height 6, got 4"):
        kernel_grad(x, x, 4)


def test_band_rows_fit_the_budget_and_divide_the_height():
    # tld-tiny's MLP (batch 32, 8×8, 512 channels): 512 KiB of float32 per row.
    assert band_rows(32, 8, 8, 512) == 2
    # at1's (16×16, 2048 channels): one row is over budget already, so bands of one row.
    assert band_rows(32, 16, 16, 2048) == 1
    assert band_rows(1, 7, 4, 4) == 7  # small maps go in one band


def test_gelu_is_the_exact_gelu():
    a = jnp.linspace(-8.0, 8.0, 1601)
    # The erf and erfc forms of a·Φ(a) in float32: a few ulps of |a|·Φ(a) ≤ 8.
    np.testing.assert_allclose(gelu(a), jax.nn.gelu(a, approximate=False), rtol=0, atol=4e-6)
    np.testing.assert_allclose(gelu(a), _gelu64(np.asarray(a, np.float64)), rtol=0, atol=4e-6)


def test_gelu_grad_is_the_derivative_of_the_exact_gelu():
    a = jnp.linspace(-8.0, 8.0, 1601)
    want = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(a)
    np.testing.assert_allclose(gelu_grad(a), want, rtol=0, atol=1e-6)


def test_bf16_fused_gelu_keeps_the_float32_result_to_bf16_rounding():
    x, w, b = _args()
    x = x.astype(jnp.bfloat16)
    y16 = np.asarray(depthwise_conv3x3_gelu(x, w, b, "shift"), np.float32)
    y32 = np.asarray(depthwise_conv3x3_gelu(x.astype(jnp.float32), w, b, "shift"))
    # Taps summed in float32, rounded once: ≤ half a bf16 ulp, 2^-8 relative (7 fraction bits).
    np.testing.assert_allclose(y16, y32, rtol=2**-8, atol=1e-6)
