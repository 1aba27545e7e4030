"""Synthetic latent data sets in the data stage's schema, written without torch or jax.

For trainer tests and the shard-reader benchmark: random latents (mean, std), pooled text
vectors, captions and validation prompts, with a complete manifest.
"""

from __future__ import annotations

import io
import os

import numpy as np

from at1_io import schema


def make_dataset(
    root: str,
    shards: int = 4,
    per_shard: int = 16,
    latent_shape=(4, 8, 8),
    text_dim: int = 32,
    seed: int = 0,
    pixel: bool = False,
    val_prompts: int = 4,
) -> schema.Manifest:
    """Write `shards` complete shards of random latents (mean, std) and pooled text vectors."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, schema.SHARD_DIR), exist_ok=True)
    infos = []
    n = 0
    for s in range(shards):
        samples = []
        for _ in range(per_shard):
            mean = rng.normal(size=latent_shape).astype(np.float16)
            std = (0 if pixel else 0.1) * np.ones(latent_shape, np.float16)
            samples.append(
                {
                    schema.KEY_FIELD: f"s{n:06d}",
                    schema.LATENT_MEAN: mean,
                    schema.LATENT_STD: std,
                    "clip_pooled": rng.normal(size=(text_dim,)).astype(np.float16),
                    schema.CAPTION_FIELD: f"sample {n}",
                    schema.META_FIELD: {"index": n},
                }
            )
            n += 1
        buf = io.BytesIO()
        schema.write_shard(buf, samples)
        data = buf.getvalue()
        name = f"{s:05d}"
        path = f"{schema.SHARD_DIR}/{name}.tar"
        with open(os.path.join(root, path), "wb") as f:
            f.write(data)
        infos.append(schema.ShardInfo(name, path, per_shard, schema.sha256_bytes(data), len(data)))
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
        licenses={},
        license_rejected={},
        caption_origins={},
        val_prompts={"path": schema.VAL_PROMPTS_PATH} if val_prompts else None,
    )
    with open(os.path.join(root, schema.MANIFEST_NAME), "w") as f:
        f.write(schema.dump_manifest(manifest))
    return manifest
