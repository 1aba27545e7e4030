"""Streaming latent shards into global batches, deterministically and resumably.

The data order is defined by S reading streams (`data.streams`, default: one per process),
not by the processes: each epoch the shard list is permuted from (seed, epoch) and dealt
round-robin to the streams; a stream reads its shards in blocks of `shuffle_shards`,
shuffles the samples of a block from (seed, epoch, block), and yields them. Stream s fills
rows [s·B/S, (s+1)·B/S) of every global batch, and process p hosts streams p·S/P …, so the
same S gives the same batches on any number of processes. A position (epoch, block, offset)
per stream names the next sample exactly, so a resumed run sees what it would have seen.
Shard bytes are checked against the manifest's size and sha256: a corrupt, truncated,
half-written or missing shard is skipped whole, with a warning, and counted. Storage that
cannot be read (S3 unreachable, access denied, I/O errors) stops the run instead.

Provenance: every batch carries the running count, by normalised licence and by source (the
shard's input), of the samples its process has taken (`Consumed`); the trainer saves the
counts of what it trained on with each checkpoint. `check_licenses` refuses a training split
that holds licences outside the allowed set; samples without licence records are "unknown".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from at1_io import schema, storage
from at1_io.constants import PIXEL, REFERENCE_LATENT_SCALE, UNKNOWN_LICENSE
from at1_jax.train.distributed import allgather_rows

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A dataset that cannot be trained on; the message says what to fix."""


class StorageUnavailable(DataError):
    """The storage holding the shards cannot be read now (unreachable, denied, I/O error)."""


@dataclasses.dataclass(frozen=True)
class Position:
    """The next sample of one process's stream."""

    epoch: int = 0
    block: int = 0
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset root and what the trainer needs from its manifest."""

    root: str
    manifest: schema.Manifest
    latent_name: str  # latent_mean (with latent_std) or latent
    text_name: str
    latent_scale: float

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.manifest.arrays[self.latent_name].shape

    @property
    def text_dim(self) -> int:
        return self.manifest.arrays[self.text_name].shape[0]

    @property
    def has_std(self) -> bool:
        return schema.LATENT_STD in self.manifest.arrays and self.latent_name == schema.LATENT_MEAN


def open_dataset(root: str, text_array: str = "", latent_scale: float = 0.0) -> Dataset:
    """Read and check the manifest; names the file and what is wrong."""
    url = storage.join(root, schema.MANIFEST_NAME)
    try:
        text = storage.read_bytes(url)
    except FileNotFoundError as e:
        raise DataError(f"{url} not found: is data.path a dataset made by data_prep.encode?") from e
    except Exception as e:  # botocore connection errors and the like
        raise DataError(f"cannot read {url}: {type(e).__name__}: {e}") from e
    try:
        manifest = schema.load_manifest(text)
    except schema.SchemaError as e:
        raise DataError(f"{url}: {e}") from e
    if not manifest.shards:
        raise DataError(f"{url} lists no complete shards")
    arrays = manifest.arrays
    latent = next((n for n in (schema.LATENT_MEAN, schema.LATENT_SAMPLE) if n in arrays), None)
    if latent is None:
        raise DataError(f"{url}: no {schema.LATENT_MEAN} or {schema.LATENT_SAMPLE} array")
    pooled = [n for n in arrays if n.endswith("_pooled")]
    name = text_array or (pooled[0] if pooled else "")
    if name not in arrays or len(arrays[name].shape) != 1:
        raise DataError(
            f"{url}: text array {name!r} is not a pooled (D,) array; "
            f"set data.text_array to one of {pooled}"
        )
    if not latent_scale:
        # The reference feeds raw VAE latents divided by 8; pixels are already in [-1, 1].
        latent_scale = (
            1.0 if manifest.autoencoder.get("kind") == PIXEL else 1.0 / REFERENCE_LATENT_SCALE
        )
    return Dataset(root, manifest, latent, name, float(latent_scale))


# Per-sample provenance kept beside the arrays (names no manifest array can have).
LICENSE_KEY, SOURCE_KEY = "__license__", "__source__"


def sample_license(meta: dict) -> str:
    """A sample's normalised licence from its json; "unknown" when it has none."""
    value = meta.get("license") if isinstance(meta, dict) else None
    return value if isinstance(value, str) and value else UNKNOWN_LICENSE


def _add(counts: dict[str, int], other: dict[str, int]) -> dict[str, int]:
    out = dict(counts)
    for k, v in other.items():
        out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class Consumed:
    """Samples trained on, by normalised licence and by source (the input of their shard)."""

    samples: int = 0
    licenses: dict[str, int] = dataclasses.field(default_factory=dict)
    sources: dict[str, int] = dataclasses.field(default_factory=dict)

    def plus(self, other: Consumed) -> Consumed:
        return Consumed(
            self.samples + other.samples,
            _add(self.licenses, other.licenses),
            _add(self.sources, other.sources),
        )

    def to_dict(self) -> dict:
        return {"samples": self.samples, "licenses": self.licenses, "sources": self.sources}

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "checkpoint metadata") -> Consumed:
        """Counts saved by `to_dict`; None (a checkpoint written before counting) is empty."""
        if d is None:
            return cls()
        ok = isinstance(d, dict) and isinstance(d.get("samples"), int)
        for part in ("licenses", "sources"):
            counts = d.get(part) if isinstance(d, dict) else None
            ok = ok and isinstance(counts, dict)
            ok = ok and all(isinstance(k, str) and isinstance(v, int) for k, v in counts.items())
        if not ok:
            raise DataError(f"{where}: 'consumed' is not {{samples, licenses, sources}}: {d!r}")
        return cls(d["samples"], _add({}, d["licenses"]), _add({}, d["sources"]))


def count_samples(samples: list[dict]) -> Consumed:
    """The provenance of samples read by a ShardStream."""
    licenses: dict[str, int] = {}
    sources: dict[str, int] = {}
    for s in samples:
        licenses[s[LICENSE_KEY]] = licenses.get(s[LICENSE_KEY], 0) + 1
        sources[s[SOURCE_KEY]] = sources.get(s[SOURCE_KEY], 0) + 1
    return Consumed(len(samples), _add({}, licenses), _add({}, sources))


def gather_consumed(local: Consumed) -> Consumed:
    """The sum of every process's counts (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return local
    blob = np.frombuffer(json.dumps(local.to_dict()).encode(), np.uint8)
    sizes = [row[0] for row in allgather_rows([blob.size])]
    padded = np.zeros(max(sizes), np.uint8)
    padded[: blob.size] = blob
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    total = Consumed()
    for row, size in zip(rows, sizes, strict=True):
        total = total.plus(Consumed.from_dict(json.loads(row[:size].tobytes())))
    return total


def training_licenses(ds: Dataset) -> dict[str, int]:
    """Training-split samples by licence; what the manifest does not account for is "unknown"."""
    counts = {k: v for k, v in ds.manifest.totals(schema.TRAIN).licenses.items() if v}
    missing = ds.manifest.num_samples - sum(counts.values())
    if missing > 0:  # written before licences were recorded, or its split totals are absent
        counts[UNKNOWN_LICENSE] = counts.get(UNKNOWN_LICENSE, 0) + missing
    return dict(sorted(counts.items()))


def check_licenses(ds: Dataset, allowed: frozenset[str]) -> dict[str, int]:
    """The training split's licence counts; a DataError if any is outside `allowed`."""
    counts = training_licenses(ds)
    refused = {k: v for k, v in counts.items() if k not in allowed}
    if not refused:
        return counts
    listed = ", ".join(f"{k} ({v} samples)" for k, v in refused.items())
    text = (
        f"{storage.join(ds.root, schema.MANIFEST_NAME)}: the training split holds licences "
        f"that config.data.licenses={','.join(sorted(allowed))} does not allow: {listed}."
    )
    if UNKNOWN_LICENSE in refused:
        text += (
            f" '{UNKNOWN_LICENSE}' counts samples without licence records (a data set written "
            "before the data stage recorded licences, or encoded with --licenses any): they "
            f"are refused unless data.licenses includes {UNKNOWN_LICENSE}."
        )
    widened = ",".join(sorted(allowed | set(refused)))
    raise DataError(
        f"{text} Re-encode with data_prep.encode --licenses (it drops other licences), or, "
        f"if you hold the rights to train on them, pass --config.data.licenses={widened}"
    )


class ShardStream:
    """One reading stream's endless, deterministic sequence of samples."""

    def __init__(self, ds: Dataset, index: int, count: int, seed: int, block: int):
        n = len(ds.manifest.shards)
        if n < count:
            raise DataError(
                f"{ds.root}: {n} shards for {count} reading streams (one per process unless "
                "data.streams is set); every stream needs at least one: write smaller shards "
                "(data_prep.encode --shard-size) or use fewer processes/streams"
            )
        self.ds, self.index, self.count = ds, index, count
        self.seed, self.block_size = seed, block
        self.skipped_shards: dict[str, str] = {}
        self.fields = [ds.latent_name, ds.text_name] + ([schema.LATENT_STD] if ds.has_std else [])

    def shards(self, epoch: int) -> list[schema.ShardInfo]:
        """This process's shards in an epoch, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds.manifest.shards))
        return [self.ds.manifest.shards[i] for i in order[self.index :: self.count]]

    def _read_shard(self, shard: schema.ShardInfo) -> list[dict[str, np.ndarray]]:
        url = storage.join(self.ds.root, shard.path)
        try:
            data = storage.read_bytes(url)
            schema.verify_shard_bytes(data, shard)
            source = shard.source or UNKNOWN_LICENSE  # shards written before sources: unknown
            return [
                {
                    **{k: s[k] for k in self.fields},
                    LICENSE_KEY: sample_license(s[schema.META_FIELD]),
                    SOURCE_KEY: source,
                }
                for s in schema.iter_shard_samples(data, shard.name, self.ds.manifest)
            ]
        except (FileNotFoundError, schema.SchemaError) as e:  # the shard itself is bad
            if shard.name not in self.skipped_shards:
                log.warning("skipping shard %s (%s): %s", shard.name, url, e)
            self.skipped_shards[shard.name] = str(e)
            return []
        except Exception as e:  # botocore/s3fs/OS errors: skipping would change the data order
            raise StorageUnavailable(
                f"cannot read shard {url}: {type(e).__name__}: {e}. No shard was skipped: "
                "check the storage (for S3: AWS_ENDPOINT_URL, the credentials) and rerun to "
                "resume from the latest checkpoint"
            ) from e

    def _block(self, epoch: int, block: int) -> list[dict[str, np.ndarray]] | None:
        shards = self.shards(epoch)[block * self.block_size : (block + 1) * self.block_size]
        if not shards:
            return None
        samples = [s for shard in shards for s in self._read_shard(shard)]
        order = np.random.default_rng([self.seed, epoch, block, 1]).permutation(len(samples))
        return [samples[i] for i in order]

    def iterate(self, pos: Position) -> Iterator[tuple[dict[str, np.ndarray], Position]]:
        """Yield (sample, position of the sample after it), starting at `pos`."""
        epoch, block, offset = pos.epoch, pos.block, pos.offset
        empty_epoch = block == 0 and offset == 0  # a resumed epoch did read samples before
        while True:
            samples = self._block(epoch, block)
            if samples is None:
                if empty_epoch and block > 0:
                    raise DataError(
                        f"{self.ds.root}: stream {self.index} read no valid sample in epoch "
                        f"{epoch}; skipped shards: {self.skipped_shards}"
                    )
                epoch, block, offset, empty_epoch = epoch + 1, 0, 0, True
                continue
            empty_epoch = empty_epoch and not samples
            for i in range(offset, len(samples)):
                yield samples[i], Position(epoch, block, i + 1)
            block, offset = block + 1, 0


def _stack(samples: list[dict[str, np.ndarray]], ds: Dataset) -> dict[str, np.ndarray]:
    batch = {
        "latent": np.stack([s[ds.latent_name] for s in samples]),
        "text": np.stack([s[ds.text_name] for s in samples]),
    }
    if ds.has_std:
        batch["latent_std"] = np.stack([s[schema.LATENT_STD] for s in samples])
    return batch


def local_streams(
    ds: Dataset, streams: int, seed: int, block: int, process: int, processes: int
) -> list[ShardStream]:
    """The streams process `process` of `processes` hosts (S/P consecutive ones)."""
    if streams % processes:
        raise DataError(f"data.streams={streams} is not a multiple of the {processes} processes")
    per = streams // processes
    return [
        ShardStream(ds, i, streams, seed, block) for i in range(process * per, (process + 1) * per)
    ]


class BatchReader:
    """Local batches read ahead by a background thread; `positions` are of what was taken.

    Each local batch is the concatenation of `per_stream` samples from each hosted stream.
    `consumed` counts the samples of the batches taken so far (not those read ahead).
    """

    def __init__(self, streams, per_stream: int, start: list[Position], prefetch: int):
        self.streams, self.per_stream = streams, per_stream
        self.positions = list(start)
        self.consumed = Consumed()
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(list(start),), daemon=True)
        self._thread.start()

    def _take(self, iterator, pos):
        samples = []
        for _ in range(self.per_stream):
            sample, pos = next(iterator)
            samples.append(sample)
        return samples, pos

    def _run(self, start: list[Position]):
        try:
            iters = [s.iterate(p) for s, p in zip(self.streams, start, strict=True)]
            positions, consumed = list(start), Consumed()
            while not self._stop.is_set():
                samples = []
                for i, it in enumerate(iters):
                    taken, positions[i] = self._take(it, positions[i])
                    samples += taken
                consumed = consumed.plus(count_samples(samples))
                item = (_stack(samples, self.streams[0].ds), list(positions), consumed)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as e:  # re-raised in the consumer's thread
            self._queue.put(e)

    def next(self) -> dict[str, np.ndarray]:
        """The next local batch (blocks until ready); re-raises reader errors."""
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        batch, self.positions, self.consumed = item
        return batch

    @property
    def skipped_shards(self) -> dict[str, str]:
        return {k: v for s in self.streams for k, v in s.skipped_shards.items()}

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
