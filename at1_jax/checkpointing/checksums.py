"""Checksums of a checkpoint's arrays and metadata, written at save and compared at restore.

Array checksums are computed where the shards live: a byte-wise hash would need every
array gathered onto one host, which a multi-host run cannot do. Each element's bits are
mixed with its index in the global array (murmur3's 32-bit finaliser) and summed modulo
2**32, twice with different seeds. Integer sums modulo 2**32 do not depend on the order of
addition, so adding up one copy of every shard gives the same value for any sharding, mesh
or process count: a restore onto another layout is verified exactly. Each shard is summed
by a single-device program (no collectives: XLA:CPU deadlocked on hundreds of small
all-reduces in flight), and the processes add their partial sums on the host.
Metadata is covered by a sha256 of its canonical JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_SEEDS = (0x9E3779B9, 0x7F4A7C15)
_MASK = 2**32 - 1


def _fmix32(x, xp):
    x = x ^ (x >> xp.uint32(16))
    x = x * xp.uint32(0x85EBCA6B)
    x = x ^ (x >> xp.uint32(13))
    x = x * xp.uint32(0xC2B2AE35)
    return x ^ (x >> xp.uint32(16))


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (64-bit elements and PRNG keys add a last axis)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = jnp.dtype(x.dtype).itemsize
    if width < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[width]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _sums(words, starts: list, strides: list[int], xp) -> list:
    """Both seeded sums of a block of words whose first element sits at `starts`."""
    index = xp.zeros((), xp.uint32)
    for axis, n in enumerate(words.shape):
        shape = [1] * words.ndim
        shape[axis] = n
        position = xp.arange(n, dtype=xp.uint32).reshape(shape) + starts[axis]
        index = index + position * xp.uint32(strides[axis])
    hashed = [_fmix32(words ^ _fmix32(index + xp.uint32(s), xp), xp) for s in _SEEDS]
    if xp is np:  # numpy has no wrapping uint32 sum: add in 64 bits, keep the low 32
        return [int(h.sum(dtype=np.uint64)) & _MASK for h in hashed]
    return [jnp.sum(h, dtype=jnp.uint32) for h in hashed]


@functools.cache
def _word_axes(dtype) -> tuple[int, ...]:
    return jax.eval_shape(_words, jax.ShapeDtypeStruct((), dtype)).shape


def _strides(shape: tuple[int, ...], dtype) -> tuple[tuple[int, ...], list[int]]:
    """Shape and strides of the array in words (wrapped to uint32)."""
    extra = _word_axes(dtype)
    dims = (*shape, *extra)
    strides, stride = [], 1
    for d in reversed(dims):
        strides.append(stride & _MASK)
        stride *= d
    return dims, strides[::-1]


def _axis_names(entry) -> tuple:
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


@functools.cache
def _sharded_program(mesh, spec, shape: tuple[int, ...], dtype):
    """One SPMD program per layout: each device sums its own block into its row of the result."""
    # A device holding a copy of a block that another device also holds adds nothing.
    _, strides = _strides(shape, dtype)
    entries = [*spec, *[None] * (len(shape) - len(spec))]
    used = {n for e in entries for n in _axis_names(e)}

    def local(block):
        words = _words(block)
        starts = []
        for dim, entry in enumerate(entries):
            position = jnp.uint32(0)
            for name in _axis_names(entry):
                position = position * jnp.uint32(mesh.shape[name]) + jax.lax.axis_index(name)
            starts.append(position.astype(jnp.uint32) * jnp.uint32(block.shape[dim]))
        starts += [jnp.uint32(0)] * (words.ndim - len(starts))
        copy = jnp.zeros((), jnp.bool_)
        for name in set(mesh.axis_names) - used:
            copy = copy | (jax.lax.axis_index(name) != 0)
        sums = jnp.stack(_sums(words, starts, strides, jnp))
        return jnp.where(copy, jnp.uint32(0), sums)[None]

    rows = P(tuple(mesh.axis_names))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=rows, check_vma=False))


@functools.partial(jax.jit, static_argnums=2)
def _single_device_program(shard: jax.Array, starts: jax.Array, strides: tuple[int, ...]):
    return jnp.stack(_sums(_words(shard), list(starts), strides, jnp))


def _host_words(block: jax.Array) -> np.ndarray:
    """`_words` in numpy, on the host memory of a CPU block (no copy, no compilation)."""
    if jax.dtypes.issubdtype(block.dtype, jax.dtypes.prng_key):
        block = jax.random.key_data(block)
    a = np.asarray(block)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    width = a.dtype.itemsize
    if width < 4:
        return a.view({1: np.uint8, 2: np.uint16}[width]).astype(np.uint32)
    extra = (width // 4,) if width > 4 else ()
    return a.reshape(-1).view(np.uint32).reshape(a.shape + extra)


def _leaf_sums(leaf: jax.Array, on_device: bool | None) -> list:
    """Partial sums of this process's share of `leaf` (one copy of each block)."""
    sharding = leaf.sharding
    dims, strides = _strides(leaf.shape, leaf.dtype)
    # XLA:CPU spends ~0.15 s compiling each small program (seconds per model on 2 cores);
    # numpy reads CPU arrays in place. Accelerators sum where the data is.
    if on_device is None:
        on_device = any(d.platform != "cpu" for d in sharding.device_set)
    if on_device and isinstance(sharding, NamedSharding) and leaf.ndim:
        rows = _sharded_program(sharding.mesh, sharding.spec, leaf.shape, leaf.dtype)(leaf)
        return [s.data[0] for s in rows.addressable_shards]
    out = []
    for shard in leaf.addressable_shards:
        if shard.replica_id:  # a replicated block counts once, wherever it lives
            continue
        starts = [(s.start or 0) for s in shard.index] + [0] * (len(dims) - leaf.ndim)
        if not on_device:
            with np.errstate(over="ignore"):  # uint32 products wrap on purpose
                words = _host_words(shard.data)
                out.append(_sums(words, np.array(starts, np.uint32), strides, np))
        else:
            starts = np.array(starts, np.uint32)
            out.append(_single_device_program(shard.data, starts, tuple(strides)))
    return out


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _local_sums(tree, on_device: bool | None = None) -> dict[str, list[int]]:
    """This process's share of each leaf's sums (on the devices, or in numpy for CPU ones)."""
    pending = {
        _path_name(path): _leaf_sums(jnp.asarray(leaf), on_device)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }
    host = jax.device_get(pending)
    return {
        name: [int(sum(int(p[i]) for p in parts) & _MASK) for i in range(len(_SEEDS))]
        for name, parts in host.items()
    }


def arrays(tree, exchange: Callable[[str], list[str]] | None = None) -> dict[str, str]:
    """{'params/blocks/0/w': 16 hex digits, …} for every array leaf of `tree`."""
    # exchange(local JSON) returns every process's partial sums; one process needs none.
    local = _local_sums(tree)
    parts = [json.loads(p) for p in exchange(json.dumps(local))] if exchange else [local]
    return {
        name: "".join(f"{sum(p[name][i] for p in parts) & _MASK:08x}" for i in range(len(_SEEDS)))
        for name in local
    }


def metadata(meta: dict) -> str:
    """sha256 of the canonical JSON of `meta` (the form orbax's JsonSave writes and reads)."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()
