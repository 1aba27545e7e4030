"""Synthetic latent data sets in the data stage's schema, written without torch or jax.

For trainer tests and the shard-reader benchmark: random latents (mean, std), pooled text
vectors, captions and validation prompts, with a complete manifest.
"""

from __future__ import annotations

import io
import os

import numpy as np

from at1_io import schema


def _write_split(
    root, folder, first, shards, per_shard, latent_shape, text_dim, rng, pixel, licenses, source
):
    """Writes shards of one split; returns their ShardInfos and per-licence counts."""
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    infos, counts, n = [], {}, first
    for s in range(shards):
        samples = []
        for _ in range(per_shard):
            license = licenses[n % len(licenses)]
            counts[license] = counts.get(license, 0) + 1
            samples.append(
                {
                    schema.KEY_FIELD: f"s{n:06d}",
                    schema.LATENT_MEAN: rng.normal(size=latent_shape).astype(np.float16),
                    schema.LATENT_STD: (0 if pixel else 0.1) * np.ones(latent_shape, np.float16),
                    "clip_pooled": rng.normal(size=(text_dim,)).astype(np.float16),
                    schema.CAPTION_FIELD: f"sample {n}",
                    schema.META_FIELD: {"index": n, "license": license, "source": source},
                }
            )
            n += 1
        buf = io.BytesIO()
        schema.write_shard(buf, samples)
        data = buf.getvalue()
        name = f"{first // per_shard + s:05d}"
        path = f"{folder}/{name}.tar"
        with open(os.path.join(root, path), "wb") as f:
            f.write(data)
        infos.append(
            schema.ShardInfo(name, path, per_shard, schema.sha256_bytes(data), len(data), source)
        )
    return infos, counts


def make_dataset(
    root: str,
    shards: int = 4,
    per_shard: int = 16,
    latent_shape=(4, 8, 8),
    text_dim: int = 32,
    seed: int = 0,
    pixel: bool = False,
    val_prompts: int = 4,
    val_shards: int = 0,
    licenses: tuple[str, ...] = ("cc0", "cc-by"),
    source: str = "synthetic",
) -> schema.Manifest:
    """Write complete shards of random latents (mean, std) and pooled text vectors.

    `shards` training shards and `val_shards` held-out ones (in val/), samples' licences
    cycling through `licenses`, all from one `source`; totals recorded as the data stage does.
    """
    rng = np.random.default_rng(seed)
    args = (per_shard, latent_shape, text_dim, rng, pixel, licenses, source)
    infos, train_counts = _write_split(root, schema.SHARD_DIR, 0, shards, *args)
    val_infos, val_counts = _write_split(root, "val", shards * per_shard, val_shards, *args)
    if val_prompts:
        vals = [
            {
                schema.KEY_FIELD: f"val{i:04d}",
                "clip_pooled": rng.normal(size=(text_dim,)).astype(np.float16),
                schema.CAPTION_FIELD: f"prompt {i}",
                schema.META_FIELD: {"index": i},
            }
            for i in range(val_prompts)
        ]
        with open(os.path.join(root, schema.VAL_PROMPTS_PATH), "wb") as f:
            schema.write_shard(f, vals)
    arrays = {
        schema.LATENT_MEAN: schema.ArraySpec(schema.LATENT_MEAN, tuple(latent_shape), "float16"),
        schema.LATENT_STD: schema.ArraySpec(schema.LATENT_STD, tuple(latent_shape), "float16"),
        "clip_pooled": schema.ArraySpec("clip_pooled", (text_dim,), "float16"),
    }
    ae = {"kind": "pixel"} if pixel else {"kind": "diffusers_autoencoder_kl", "model": "none"}

    def totals(infos, counts):
        n = sum(i.num_samples for i in infos)
        return schema.SplitTotals(n, len(infos), counts, {source: n} if n else {}, {}, {})

    both = {k: train_counts.get(k, 0) + val_counts.get(k, 0) for k in {*train_counts, *val_counts}}
    manifest = schema.Manifest(
        schema_version=schema.SCHEMA_VERSION,
        arrays=arrays,
        shards=infos,
        autoencoder=ae,
        text_encoders=[{"name": "clip", "kind": "clip", "model": "tiny"}],
        captioning=None,
        settings={},
        skipped={},
        repaired={},
        licenses=both,
        license_rejected={},
        caption_origins={},
        val_prompts={"path": schema.VAL_PROMPTS_PATH} if val_prompts else None,
        val_shards=val_infos,
        sources={source: (shards + val_shards) * per_shard},
        # Per-split totals as the data stage writes them with a split; none without one.
        splits={
            schema.TRAIN: totals(infos, train_counts),
            schema.VAL: totals(val_infos, val_counts),
        }
        if val_shards
        else {},
    )
    with open(os.path.join(root, schema.MANIFEST_NAME), "w") as f:
        f.write(schema.dump_manifest(manifest))
    return manifest
