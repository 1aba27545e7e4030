"""The one place where logical axis names meet the device mesh.

Model code tags each parameter with `logical_axes` metadata (e.g. ("embed", "mlp")); a
rules table maps each logical name to mesh axes. Mesh axes: `data` (pure data
parallelism), `fsdp` (data parallelism with parameters, gradients and optimiser state
sharded), `tensor` (attention/MLP weights split across devices).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
GRAD_REDUCE = ("auto", "flat", "xla")  # MeshConfig.grad_reduce
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# FSDP over the model width; tensor parallelism over attention projections and MLP hidden.
# "cond" (the width of the noise/text conditioning layers, <3% of the weights) stays
# replicated: split over fsdp, XLA's SPMD partitioner turned their batch-split gradients of
# shape (B, E) into E-split ones by replicating them ("Involuntary full rematerialization").
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); -1 takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    asked = dict(zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {asked}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {asked}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices) or min(sizes) < 1:
        raise ValueError(
            f"mesh: data×fsdp×tensor = {'×'.join(map(str, sizes))} must equal the "
            f"{len(devices)} available devices"
        )
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def spec_for(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules,
    replicate_fsdp: bool = False,
):
    """PartitionSpec for one array: each mesh axis used once, only where it divides the dim.

    replicate_fsdp: the array stays whole along the `fsdp` axis (too small to be worth it).
    """
    table = dict(rules)
    used: set[str] = {"fsdp"} if replicate_fsdp else set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
        if targets and dim % math.prod(mesh.shape[t] for t in targets) == 0:
            used.update(targets)
            spec.append(targets[0] if len(targets) == 1 else targets)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _is_var(x):
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES, min_fsdp_mib: float = 0.0):
    """NamedShardings for an nnx State (or any pytree of Variables carrying logical_axes).

    Arrays of at most `min_fsdp_mib` MiB are not split over `fsdp` (big_vision's
    min_size_to_shard_mb): gathering them every step costs more than the memory they save.
    """

    def one(var):
        axes = var.get_metadata().get("logical_axes") or (None,) * var.ndim
        small = math.prod(var.shape) * np.dtype(var.dtype).itemsize <= min_fsdp_mib * 2**20
        spec = spec_for(axes, var.shape, mesh, rules, replicate_fsdp=small)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel mesh axes, the rest replicated."""
    target = dict(rules).get("batch")
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    return NamedSharding(mesh, PartitionSpec(targets or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place every array of `model` on `mesh` according to `rules` (in place; returns it)."""
    state = nnx.state(model)
    placed = jax.device_put(state, state_shardings(state, mesh, rules))
    nnx.update(model, placed)
    return model


def batch_axes(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the batch is split over."""
    spec = batch_sharding(mesh, rules).spec[0] or ()
    return (spec,) if isinstance(spec, str) else tuple(spec)


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the batch is split: global batches must be a multiple of it."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh, rules)]))


def split_arrays(shardings) -> int:
    """How many arrays of a pytree of NamedShardings are split over some mesh axis."""
    return sum(not s.is_fully_replicated for s in jax.tree.leaves(shardings))


def flat_grad_reduce(mode: str, shardings, mesh: Mesh) -> bool:
    """Whether the step sums gradients as one flat buffer (MeshConfig.grad_reduce)."""
    if mode != "auto":
        return mode == "flat"
    # gloo, XLA:CPU's transport between processes, runs a tuple all-reduce one array at a
    # time, a TCP ring each; NCCL and in-process collectives sum the tuple in one go.
    cross_process = mesh.devices.flat[0].platform == "cpu" and jax.process_count() > 1
    return cross_process and split_arrays(shardings) == 0
