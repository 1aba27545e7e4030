"""Depthwise 3×3 convolution ("same" padding), in two formulations with equal numbers.

`conv` is XLA's grouped convolution: what cuDNN runs well on GPU. On XLA:CPU it is ~10×
slower than PyTorch, almost all of it in the kernel gradient, which XLA lowers to a dense
convolution. `shift` writes the conv as 9 shifted multiply-adds with a hand-written VJP
whose kernel/bias gradients are per-channel sums done as (1, N) @ (N, C) products, which
XLA:CPU runs far faster than column reductions (see docs/performance.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

TAPS = tuple((i, j) for i in range(3) for j in range(3))


def depthwise_conv3x3(x_BHWC, w_33C, b_C, impl: str = "auto"):
    """y[b, y, x, c] = b[c] + Σ_ij x[b, y+i−1, x+j−1, c]·w[i, j, c] (cross-correlation)."""
    if impl == "auto":
        impl = "shift" if jax.default_backend() == "cpu" else "conv"
    if impl == "conv":
        return _grouped_conv(x_BHWC, w_33C) + b_C
    if impl == "shift":
        return _shift_conv(x_BHWC, w_33C, b_C)
    raise ValueError(f"depthwise impl must be 'auto', 'conv' or 'shift', got {impl!r}")


def _grouped_conv(x_BHWC, w_33C):
    C = x_BHWC.shape[-1]
    return lax.conv_general_dilated(
        x_BHWC,
        w_33C[:, :, None, :],
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=C,
    )


def _taps_sum(xp_BHWC, w_33C, H, W, flip: bool):
    """Σ over the 9 taps of a shifted window of the padded input times the tap's weights."""
    out = None
    for i, j in TAPS:
        si, sj = (2 - i, 2 - j) if flip else (i, j)
        term = xp_BHWC[:, si : si + H, sj : sj + W, :] * w_33C[i, j]
        out = term if out is None else out + term
    return out


def _pad(x_BHWC):
    return jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _channel_sum(a_NC):
    """Σ_n a[n, c] as a (1, N) @ (N, C) product, accumulated in float32."""
    ones = jnp.ones((1, a_NC.shape[0]), a_NC.dtype)
    return jnp.dot(ones, a_NC, preferred_element_type=jnp.float32)[0]


@jax.custom_vjp
def _shift_conv(x_BHWC, w_33C, b_C):
    _, H, W, _ = x_BHWC.shape
    return _taps_sum(_pad(x_BHWC), w_33C, H, W, flip=False) + b_C


def _shift_conv_fwd(x_BHWC, w_33C, b_C):
    return _shift_conv(x_BHWC, w_33C, b_C), (x_BHWC, w_33C, b_C)


def _shift_conv_bwd(res, dy_BHWC):
    x_BHWC, w_33C, b_C = res
    _, H, W, C = x_BHWC.shape
    # dx is the same conv of dy with the kernel flipped in both spatial axes.
    dx = _taps_sum(_pad(dy_BHWC), w_33C, H, W, flip=True)
    xp = _pad(x_BHWC)
    dy_NC = dy_BHWC.reshape(-1, C)
    dw = jnp.stack(
        [_channel_sum(xp[:, i : i + H, j : j + W, :].reshape(-1, C) * dy_NC) for i, j in TAPS]
    ).reshape(3, 3, C)
    db = _channel_sum(dy_NC)
    return dx, dw.astype(w_33C.dtype), db.astype(b_C.dtype)


_shift_conv.defvjp(_shift_conv_fwd, _shift_conv_bwd)
