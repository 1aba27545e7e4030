"""Validation loss: the x0-loss on a fixed subset of held-out data at fixed noise levels.

Comparable across runs, batch sizes and objectives, unlike the training loss (which mixes
the noise levels the objective happens to draw): each of the first `log.val_samples`
samples of the validation split is noised at the centre of each of `log.val_bins` equal
bins of sigma in (0, 1), with noise drawn from (VALIDATION_SEED, sample index, bin), and
the loss is averaged per bin and over the bins. The clean target is the stored latent
(the posterior mean for VAE latents, no re-sampling) times the data set's latent scale and
the text is never dropped, so the number depends on the weights alone. Per-sample losses
come back to the host and are summed there in a fixed order, so meshes and process counts
change only the model's own float32 rounding. One compiled function serves every call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from at1_io import schema, storage
from at1_jax.model.objective import add_noise
from at1_jax.train import sharding
from at1_jax.train.data import DataError, Dataset, StorageUnavailable, open_dataset

# Fixed for every run and for `python -m at1_jax.evaluate --val-loss`, so losses compare.
VALIDATION_SEED = 0


def sigma_levels(bins: int) -> np.ndarray:
    """The centres of `bins` equal bins of sigma in (0, 1): 0.1, 0.3, …, 0.9 for 5."""
    return ((np.arange(bins) + 0.5) / bins).astype(np.float32)


def bin_names(bins: int) -> list[str]:
    """Per-bin suffixes of the logged names: sigma_0.10, …"""
    return [f"sigma_{s:.2f}" for s in sigma_levels(bins)]


@dataclasses.dataclass(frozen=True)
class ValidationSet:
    """The held-out samples, ready for the model: x0 = stored latent × latent scale."""

    root: str
    split: str
    x0: np.ndarray  # f32[N, C, H, W]
    text: np.ndarray  # f32[N, D]

    @property
    def size(self) -> int:
        return len(self.x0)

    def describe(self) -> dict:
        return {"root": self.root, "split": self.split, "samples": self.size}


def _compatible(train: Dataset, val: Dataset) -> None:
    """A validation set must feed the model what training feeds it: same arrays and encoders."""
    problems = []
    if val.latent_shape != train.latent_shape:
        problems.append(f"latents {val.latent_shape} vs {train.latent_shape}")
    if val.text_name != train.text_name or val.text_dim != train.text_dim:
        problems.append(
            f"text array {val.text_name!r} {val.text_dim}-d vs {train.text_name!r} "
            f"{train.text_dim}-d"
        )
    for field in ("kind", "model"):
        a, b = val.manifest.autoencoder.get(field), train.manifest.autoencoder.get(field)
        if a != b:
            problems.append(f"autoencoder {field} {a!r} vs {b!r}")

    def encoder(ds):
        name = ds.text_name.removesuffix("_pooled")
        found = [e for e in ds.manifest.text_encoders if e.get("name", e.get("kind")) == name]
        return found[0].get("model") if found else None

    if encoder(val) != encoder(train):
        problems.append(f"text encoder {encoder(val)!r} vs {encoder(train)!r}")
    if problems:
        raise DataError(
            f"data.val_path {val.root} was not encoded like data.path {train.root} "
            f"({'; '.join(problems)}): its loss would not measure this model. Encode the "
            "validation images with the same data_prep.encode settings"
        )


def find_split(ds: Dataset, val_path: str = "") -> tuple[Dataset, str] | None:
    """The validation data: `val_path`'s val/ split (or its shards), else `ds`'s val/ split.

    None when `val_path` is empty and the data set holds no validation split.
    """
    if not val_path:
        return (ds, schema.VAL) if ds.manifest.val_shards else None
    val = open_dataset(val_path, ds.text_name, ds.latent_scale)
    _compatible(ds, val)
    return val, schema.VAL if val.manifest.val_shards else schema.TRAIN


def _samples(ds: Dataset, split: str) -> Iterator[dict]:
    def read(shard: schema.ShardInfo) -> bytes:
        url = storage.join(ds.root, shard.path)
        try:
            return storage.read_bytes(url)
        except FileNotFoundError as e:
            raise DataError(f"validation shard {url} not found: {e}") from e
        except Exception as e:  # botocore/s3fs/OS errors
            raise StorageUnavailable(f"cannot read validation shard {url}: {e}") from e

    try:
        yield from schema.iter_split_samples(ds.manifest, split, read)
    except schema.SchemaError as e:
        raise DataError(
            f"{ds.root} {split} split: {e}. A damaged validation shard is an error, never a "
            "smaller validation set: re-encode the data set"
        ) from e


def load_split(ds: Dataset, split: str, limit: int) -> ValidationSet:
    """The first `limit` samples of a split in manifest order (fewer if it holds fewer)."""
    x0, text = [], []
    for sample in _samples(ds, split):
        if len(x0) == limit:
            break
        x0.append(sample[ds.latent_name].astype(np.float32) * np.float32(ds.latent_scale))
        text.append(sample[ds.text_name].astype(np.float32))
    if not x0:
        raise DataError(f"{ds.root}: its {split} split holds no samples for the validation loss")
    return ValidationSet(ds.root, split, np.stack(x0), np.stack(text))


class Validator:
    """Per-bin x0-losses of given weights on a ValidationSet, compiled once for the mesh.

    Up to `chunk` samples go through the model per call (a multiple of the mesh's
    data-parallel size); the set is padded to whole chunks and the padding dropped on the host.
    `param_shardings`/`buffer_shardings`: those of the weights passed in (the train state's);
    None places them replicated.
    """

    def __init__(
        self,
        vset: ValidationSet,
        graphdef: nnx.GraphDef,
        mesh: Mesh,
        bins: int,
        chunk: int,
        rules=sharding.DEFAULT_RULES,
        param_shardings=None,
        buffer_shardings=None,
    ):
        dp = sharding.data_parallel_size(mesh, rules)
        if chunk % dp:
            raise ValueError(f"validation chunk {chunk} is not a multiple of the {dp} data shards")
        self.vset, self.bins, self.mesh = vset, bins, mesh
        self.names = bin_names(bins)
        batch = sharding.batch_sharding(mesh, rules)
        replicated = sharding.replicated(mesh)
        self._param_sh = param_shardings or replicated
        self._buffer_sh = buffer_shardings or replicated
        n = vset.size
        chunk = min(chunk, -(-n // dp) * dp)  # a small set is not padded to a large batch
        padded = -(-n // chunk) * chunk
        x0 = np.zeros((padded, *vset.x0.shape[1:]), np.float32)
        text = np.zeros((padded, vset.text.shape[1]), np.float32)
        x0[:n], text[:n] = vset.x0, vset.text
        index = np.arange(padded, dtype=np.int32)

        def place(a: np.ndarray, start: int):
            part = a[start : start + chunk]
            return jax.make_array_from_callback(part.shape, batch, lambda idx: part[idx])

        self._chunks = [
            tuple(place(a, i) for a in (x0, text, index)) for i in range(0, padded, chunk)
        ]
        levels = jnp.asarray(sigma_levels(bins))
        base = jax.random.key(VALIDATION_SEED)

        def losses(params, buffers, x0_BCHW, text_BD, index_B):
            model = nnx.merge(graphdef, params, buffers)

            def one_bin(b):
                sigma_B1 = jnp.full((x0_BCHW.shape[0], 1), levels[b], jnp.float32)
                keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), b))(
                    index_B
                )
                eps = jax.vmap(lambda k: jax.random.normal(k, x0_BCHW.shape[1:]))(keys)
                pred = model(add_noise(x0_BCHW, sigma_B1, eps), sigma_B1, text_BD)
                return jnp.mean(jnp.square(pred - x0_BCHW), axis=(1, 2, 3))

            return jax.lax.map(one_bin, jnp.arange(bins)).T  # (B, bins)

        self._jitted = jax.jit(
            losses,
            in_shardings=(self._param_sh, self._buffer_sh, batch, batch, batch),
            out_shardings=replicated,
        )
        self._compiled = None

    def _place(self, tree, shardings):
        if isinstance(shardings, NamedSharding):  # one sharding for every leaf
            return jax.device_put(tree, shardings)
        return tree  # already laid out as the train state

    def per_bin(self, params, buffers) -> np.ndarray:
        """f64[bins]: each bin's loss averaged over the validation samples."""
        params = self._place(params, self._param_sh)
        buffers = self._place(buffers, self._buffer_sh)
        if self._compiled is None:  # ahead of time: a later call can never recompile
            self._compiled = self._jitted.lower(params, buffers, *self._chunks[0]).compile()
        rows = [np.asarray(self._compiled(params, buffers, *c)) for c in self._chunks]
        per_sample = np.concatenate(rows)[: self.vset.size].astype(np.float64)
        return per_sample.mean(axis=0)

    def losses(self, params, buffers, prefix: str) -> dict[str, float]:
        """{prefix: mean over bins, prefix_sigma_0.10: bin loss, …}."""
        bins = self.per_bin(params, buffers)
        out = {prefix: float(bins.mean())}
        out.update({f"{prefix}_{n}": float(v) for n, v in zip(self.names, bins, strict=True)})
        return out

    def evaluate(self, state: dict) -> dict[str, float]:
        """Validation losses of the live weights (val_loss…) and the EMA (val_loss_ema…)."""
        return {
            **self.losses(state["params"], state["buffers"], "val_loss"),
            **self.losses(state["ema"], state["buffers"], "val_loss_ema"),
        }
