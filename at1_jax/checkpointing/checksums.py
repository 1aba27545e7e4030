"""Checksums of a checkpoint's arrays and metadata, written at save and compared at restore.

Array checksums are computed on the devices that hold the shards: a byte-wise hash would
need every array gathered onto one host, which a multi-host run cannot do. Each element's
bits are mixed with its flat index (murmur3's 32-bit finaliser) and summed modulo 2**32,
twice with different seeds. Integer sums modulo 2**32 do not depend on the order of
addition, so the result is identical for any sharding, mesh or process count, and a
restore onto another layout is verified exactly. Metadata is covered by a sha256 of its
canonical JSON.
"""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _fmix32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (64-bit elements give two words, on a last axis)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = jnp.dtype(x.dtype).itemsize
    if width == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if width < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[width]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., width // 4)


def _leaf(x: jax.Array) -> tuple[jax.Array, ...]:
    words = _words(x)
    # Flat index from per-axis iotas: elementwise, so the array keeps its sharding.
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    # Scalars: XLA cannot shard them, so every process holds both sums.
    return tuple(
        jnp.sum(_fmix32(words ^ _fmix32(index + jnp.uint32(seed))), dtype=jnp.uint32)
        for seed in _SEEDS
    )


@jax.jit
def _digests(leaves: list) -> list:
    return [_leaf(x) for x in leaves]


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def arrays(tree) -> dict[str, str]:
    """{'params/blocks/0/w': 16 hex digits, …} for every array leaf of `tree`."""
    named = jax.tree_util.tree_leaves_with_path(tree)
    if not named:
        return {}
    values = _digests([jnp.asarray(v) for _, v in named])
    out = {}
    for (path, _), sums in zip(named, values, strict=True):
        words = [int(np.asarray(s.addressable_data(0))) for s in sums]
        out[_path_name(path)] = "".join(f"{w:08x}" for w in words)
    return out


def metadata(meta: dict) -> str:
    """sha256 of the canonical JSON of `meta` (the form orbax's JsonSave writes and reads)."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()
