"""gelu(depthwise 3×3 conv + bias) as one C++ kernel per pass on XLA:CPU (depthwise="native").

The kernels (native/depthwise_gelu.cc) compute in float32 for float32 or bfloat16 storage,
keep the backward pass's intermediates in cache, and return the kernel and bias gradients per
example so that XLA sums them over the batch, also when the batch is split across devices.
A sharding rule lets XLA split the calls by batch and channels like the ops around them: the
height and width stay whole on every device (each output pixel reads its neighbours)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from at1_jax.model.native import build

F32 = jnp.float32
FORWARD = "at1_depthwise_gelu_forward"
BACKWARD = "at1_depthwise_gelu_backward"


@functools.cache
def _register() -> None:
    lib = build.library()
    handlers = {FORWARD: lib.At1DepthwiseGeluForward, BACKWARD: lib.At1DepthwiseGeluBackward}
    for name, fn in handlers.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="cpu")


def unavailable_reason() -> str | None:
    """None where the kernels run (CPU backend, library built), else why they do not."""
    if jax.default_backend() != "cpu":
        return f"the native depthwise kernels are for CPU, the backend is {jax.default_backend()}"
    try:
        _register()
    except build.NativeBuildError as e:
        return str(e)
    return None


def _forward_call(x_BHWC, w_33C, b_C):
    out = jax.ShapeDtypeStruct(x_BHWC.shape, x_BHWC.dtype)
    return jax.ffi.ffi_call(FORWARD, out)(x_BHWC, w_33C, b_C)


def _backward_call(x_BHWC, w_33C, b_C, dy_BHWC):
    B, _, _, C = x_BHWC.shape
    out = (
        jax.ShapeDtypeStruct(x_BHWC.shape, x_BHWC.dtype),
        jax.ShapeDtypeStruct((B, 9, C), F32),
        jax.ShapeDtypeStruct((B, C), F32),
    )
    return jax.ffi.ffi_call(BACKWARD, out)(x_BHWC, w_33C, b_C, dy_BHWC)


def _batch_channel_specs(arg_shapes):
    """The mesh axes x's batch and channels are split over (height and width: none)."""
    sharding = arg_shapes[0].sharding
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    spec += (None,) * (4 - len(spec))
    return spec[0], spec[3]


def _forward_shardings(mesh, arg_shapes, result_shape):
    del result_shape
    batch, chan = _batch_channel_specs(arg_shapes)
    return NamedSharding(mesh, P(batch, None, None, chan))


def _forward_partition(mesh, arg_shapes, result_shape):
    batch, chan = _batch_channel_specs(arg_shapes)
    x = NamedSharding(mesh, P(batch, None, None, chan))
    args = (x, NamedSharding(mesh, P(None, None, chan)), NamedSharding(mesh, P(chan)))
    return mesh, _forward_call, _forward_shardings(mesh, arg_shapes, result_shape), args


def _backward_shardings(mesh, arg_shapes, result_shape):
    del result_shape
    batch, chan = _batch_channel_specs(arg_shapes)
    return (
        NamedSharding(mesh, P(batch, None, None, chan)),
        NamedSharding(mesh, P(batch, None, chan)),
        NamedSharding(mesh, P(batch, chan)),
    )


def _backward_partition(mesh, arg_shapes, result_shape):
    batch, chan = _batch_channel_specs(arg_shapes)
    x = NamedSharding(mesh, P(batch, None, None, chan))
    args = (x, NamedSharding(mesh, P(None, None, chan)), NamedSharding(mesh, P(chan)), x)
    return mesh, _backward_call, _backward_shardings(mesh, arg_shapes, result_shape), args


_forward = custom_partitioning(_forward_call)
_forward.def_partition(
    _forward_partition,
    infer_sharding_from_operands=_forward_shardings,
    sharding_rule="b h w c, i j c, c -> b h w c",
    need_replication_factors=("h", "w", "i", "j"),
)
_backward = custom_partitioning(_backward_call)
_backward.def_partition(
    _backward_partition,
    infer_sharding_from_operands=_backward_shardings,
    sharding_rule="b h w c, i j c, c, b h w c -> b h w c, b k c, b c",
    need_replication_factors=("h", "w", "i", "j", "k"),
)


@jax.custom_vjp
def depthwise_conv3x3_gelu(x_BHWC, w_33C, b_C):
    """gelu(depthwise 3×3 conv of x + b), exact GELU, float32 math, in x's dtype."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"model.depthwise='native': {reason}; use 'shift'")
    return _forward(x_BHWC, w_33C.astype(F32), b_C.astype(F32))


def _fwd(x_BHWC, w_33C, b_C):
    return depthwise_conv3x3_gelu(x_BHWC, w_33C, b_C), (x_BHWC, w_33C, b_C)


def _bwd(res, dy_BHWC):
    x_BHWC, w_33C, b_C = res
    C = x_BHWC.shape[-1]
    dx, dw_B9C, db_BC = _backward(x_BHWC, w_33C.astype(F32), b_C.astype(F32), dy_BHWC)
    dw = jnp.sum(dw_B9C, axis=0).reshape(3, 3, C)
    return dx, dw.astype(w_33C.dtype), jnp.sum(db_BC, axis=0).astype(b_C.dtype)


depthwise_conv3x3_gelu.defvjp(_fwd, _bwd)
