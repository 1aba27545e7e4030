"""Depthwise 3×3 convolution ("same" padding), alone or followed by the exact GELU.

Three formulations with equal numbers. `native` (CPU, what `auto` picks there) runs the
fused conv and GELU as one C++ kernel per pass (depthwise_native.py); where it cannot be
built, `auto` falls back to `shift`. `conv` is XLA's grouped convolution: what cuDNN runs
well on GPU. On XLA:CPU it is ~10× slower than PyTorch, almost all of it in the kernel
gradient, which XLA lowers to a dense convolution. `shift` writes the conv as 9 shifted
multiply-adds with a hand-written VJP. All sum the taps in float32 whatever the input
dtype: XLA:CPU rounds every intermediate of a bf16 elementwise chain to bf16, which is
slower than float32 arithmetic and loses precision. `shift`'s `depthwise_conv3x3_gelu`
fuses the conv with the GELU that follows it in the MLP: its backward pass recomputes the
conv from the input instead of storing the 9 taps or the pre-activation, and sums the
kernel gradient one band of rows at a time (see docs/performance.md)."""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax

from at1_jax.model import depthwise_native

log = logging.getLogger(__name__)
IMPLS = ("auto", "conv", "shift", "native")
TAPS = tuple((i, j) for i in range(3) for j in range(3))
F32 = jnp.float32


def _resolve(impl: str) -> str:
    if impl == "auto":
        return auto_impl()
    if impl not in IMPLS:
        raise ValueError(f"depthwise impl must be one of {IMPLS}, got {impl!r}")
    return impl


def auto_impl() -> str:
    """What `auto` means here: native on CPU where its kernel builds, else shift; conv off CPU."""
    if jax.default_backend() != "cpu":
        return "conv"
    reason = depthwise_native.unavailable_reason()
    if reason:
        _warn_fallback(reason)
        return "shift"
    return "native"


@functools.cache
def _warn_fallback(reason: str) -> None:
    log.warning("depthwise 'auto' runs 'shift' (slower): %s", reason)


def depthwise_conv3x3(x_BHWC, w_33C, b_C, impl: str = "auto"):
    """y[b, y, x, c] = b[c] + Σ_ij x[b, y+i−1, x+j−1, c]·w[i, j, c] (cross-correlation)."""
    # The native kernel is the fused conv + GELU the model runs; the conv alone is `shift`.
    if _resolve(impl) == "conv":
        return (_grouped_conv(x_BHWC, w_33C) + b_C.astype(F32)).astype(x_BHWC.dtype)
    return _shift_conv(x_BHWC, w_33C, b_C)


def depthwise_conv3x3_gelu(x_BHWC, w_33C, b_C, impl: str = "auto"):
    """gelu(depthwise_conv3x3(x, w, b)) with the exact (erf) GELU, in float32, cast to x's dtype."""
    impl = _resolve(impl)
    if impl == "conv":
        y = _grouped_conv(x_BHWC, w_33C) + b_C.astype(F32)
        return gelu(y).astype(x_BHWC.dtype)
    if impl == "native":
        return depthwise_native.depthwise_conv3x3_gelu(x_BHWC, w_33C, b_C)
    return _shift_conv_gelu(x_BHWC, w_33C, b_C)


def gelu(a):
    """The exact GELU a·Φ(a) as PyTorch writes it, a/2·(1 + erf(a/√2))."""
    # jax.nn.gelu(approximate=False) goes through erfc, whose two branches XLA:CPU evaluates
    # for every element: the forward pass of the fused conv was ~1.4× slower with it.
    return 0.5 * a * (1.0 + lax.erf(a * (1.0 / math.sqrt(2.0))))


def _grouped_conv(x_BHWC, w_33C):
    C = x_BHWC.shape[-1]
    return lax.conv_general_dilated(
        x_BHWC,
        w_33C[:, :, None, :].astype(x_BHWC.dtype),
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=C,
        preferred_element_type=F32,
    )


def _taps_sum(xp_BHWC, w_33C, H, W, flip: bool):
    """Σ over the 9 taps of a shifted window of the padded input times the tap's weights (f32)."""
    out = None
    for i, j in TAPS:
        si, sj = (2 - i, 2 - j) if flip else (i, j)
        term = xp_BHWC[:, si : si + H, sj : sj + W, :].astype(F32) * w_33C[i, j].astype(F32)
        out = term if out is None else out + term
    return out


def _pad(x_BHWC):
    return jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))


def channel_sum(a_NC):
    """Σ_n a[n, c] in float32 (XLA:CPU runs this column sum as one YNNPACK reduction)."""
    return jnp.sum(a_NC, axis=0, dtype=F32)


def _conv_f32(x_BHWC, w_33C, b_C):
    _, H, W, _ = x_BHWC.shape
    return _taps_sum(_pad(x_BHWC), w_33C, H, W, flip=False) + b_C.astype(F32)


# Float32 bytes of one band's shifted input in the kernel gradient: XLA:CPU writes each
# tap's shifted product to memory before reducing it, and bands this size keep the nine
# in cache (the kernel gradient alone, whole map → bands: 4.0 → 2.7 ms at tld-tiny's MLP
# shape, 70–91 → 66–69 ms at at1's, and ~3 GiB less peak memory in at1's step).
BAND_BYTES = 1 << 20


def band_rows(B: int, H: int, W: int, C: int) -> int:
    """Rows per band of the kernel gradient: the most that divide H and fit BAND_BYTES."""
    fits = [r for r in range(1, H + 1) if H % r == 0 and B * r * W * C * 4 <= BAND_BYTES]
    return max(fits, default=1)


def kernel_grad(x_BHWC, dy_BHWC, rows: int | None = None):
    """dw[i, j, c] = Σ_{b,y,x} x[b, y+i−1, x+j−1, c]·dy[b, y, x, c] in float32, by row bands."""
    B, H, W, C = x_BHWC.shape
    rows = rows or band_rows(B, H, W, C)
    if H % rows:
        raise ValueError(f"rows per band must divide the height {H}, got {rows}")
    xp = _pad(x_BHWC)

    def band(dw_B9C, r0):
        xp_b = lax.dynamic_slice_in_dim(xp, r0, rows + 2, axis=1)
        dy_BNC = lax.dynamic_slice_in_dim(dy_BHWC, r0, rows, axis=1).reshape(B, -1, C)
        dy_BNC = dy_BNC.astype(F32)
        taps = [
            jnp.sum(xp_b[:, i : i + rows, j : j + W, :].reshape(B, -1, C) * dy_BNC, axis=1)
            for i, j in TAPS
        ]
        # Partial sums per example: the sum over the (possibly sharded) batch happens once,
        # after the loop, not as one all-reduce per band.
        return dw_B9C + jnp.stack(taps, axis=1), None

    dw_B9C, _ = lax.scan(band, jnp.zeros((B, 9, C), F32), jnp.arange(0, H, rows))
    return jnp.sum(dw_B9C, axis=0).reshape(3, 3, C)


def _conv_grads(x_BHWC, w_33C, b_C, dy_BHWC):
    """Gradients of the conv for the output cotangent dy: (dx, dw, db) in the inputs' dtypes."""
    _, H, W, C = x_BHWC.shape
    # dx is the same conv of dy with the kernel flipped in both spatial axes.
    dx = _taps_sum(_pad(dy_BHWC), w_33C, H, W, flip=True).astype(x_BHWC.dtype)
    dw = kernel_grad(x_BHWC, dy_BHWC)
    db = channel_sum(dy_BHWC.reshape(-1, C).astype(F32))
    return dx, dw.astype(w_33C.dtype), db.astype(b_C.dtype)


@jax.custom_vjp
def _shift_conv(x_BHWC, w_33C, b_C):
    return _conv_f32(x_BHWC, w_33C, b_C).astype(x_BHWC.dtype)


def _shift_conv_fwd(x_BHWC, w_33C, b_C):
    return _shift_conv(x_BHWC, w_33C, b_C), (x_BHWC, w_33C, b_C)


def _shift_conv_bwd(res, dy_BHWC):
    res, dy_BHWC = lax.optimization_barrier((res, dy_BHWC))  # see _shift_conv_gelu_bwd
    return _conv_grads(*res, dy_BHWC)


_shift_conv.defvjp(_shift_conv_fwd, _shift_conv_bwd)


def gelu_grad(a):
    """d/da of the exact GELU a·Φ(a): Φ(a) + a·φ(a)."""
    cdf = 0.5 * (1.0 + lax.erf(a * (1.0 / math.sqrt(2.0))))
    return cdf + a * jnp.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))


@jax.custom_vjp
def _shift_conv_gelu(x_BHWC, w_33C, b_C):
    return gelu(_conv_f32(x_BHWC, w_33C, b_C)).astype(x_BHWC.dtype)


def _shift_conv_gelu_fwd(x_BHWC, w_33C, b_C):
    return _shift_conv_gelu(x_BHWC, w_33C, b_C), (x_BHWC, w_33C, b_C)


def _shift_conv_gelu_bwd(res, dy_BHWC):
    # The barrier keeps XLA from computing what depends on x alone (the taps, in float32)
    # during the forward pass and holding it for every block until the backward pass.
    (x_BHWC, w_33C, b_C), dy_BHWC = lax.optimization_barrier((res, dy_BHWC))
    # Recomputing the 9-tap sum costs less than storing it (an f32 copy of the MLP hidden).
    da = dy_BHWC.astype(F32) * gelu_grad(_conv_f32(x_BHWC, w_33C, b_C))
    return _conv_grads(x_BHWC, w_33C, b_C, da.astype(x_BHWC.dtype))


_shift_conv_gelu.defvjp(_shift_conv_gelu_fwd, _shift_conv_gelu_bwd)
