"""The two depthwise 3×3 conv formulations agree in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at1_jax.model.depthwise import depthwise_conv3x3


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
    with pytest.raises(ValueError, match="'conv' or 'shift'"):
        depthwise_conv3x3(*_args(), "fft")
