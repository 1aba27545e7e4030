"""Turn one chunk of raw input items into encoded samples, counting every skip and repair."""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any

import numpy as np
from PIL import Image

from data_prep import images, licenses
from data_prep.autoencoders import latent_outputs
from data_prep.input_items import RawSample, ReadFailure
from data_prep.models import Models
from data_prep.settings import EncodeSettings

log = logging.getLogger(__name__)
CAPTION_THUMB = 768  # captioners resize to ~336-448 px; keeping full images costs memory


@dataclasses.dataclass
class ChunkCounts:
    """Counters that go into a shard record."""

    skipped: Counter = dataclasses.field(default_factory=Counter)
    repaired: Counter = dataclasses.field(default_factory=Counter)
    licenses: Counter = dataclasses.field(default_factory=Counter)
    license_rejected: Counter = dataclasses.field(default_factory=Counter)
    caption_origins: Counter = dataclasses.field(default_factory=Counter)


@dataclasses.dataclass
class Prepared:
    """A decoded item ready for the models."""

    index: int
    item: RawSample
    decision: licenses.Decision
    pixels: np.ndarray
    thumb: Image.Image | None
    decoded: images.DecodedImage


def seed_for(*parts: int) -> int:
    """A stable 31-bit seed from integers (reruns of a shard draw the same numbers)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes()) & 0x7FFFFFFF


def bounded_map(pool: Executor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """Ordered pool.map that keeps at most ``window`` results in flight (bounded memory)."""
    pending: deque = deque()
    for x in items:
        pending.append(pool.submit(fn, x))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class ChunkEncoder:
    """Filters, decodes, captions and encodes the items of one shard."""

    def __init__(self, s: EncodeSettings, models: Models, pool: Executor):
        self.s, self.models, self.pool = s, models, pool
        self.allowed = licenses.parse_allowed(s.licenses)
        self.need_thumbs = s.caption != "off"

    def _prepare(self, job: tuple[int, RawSample, licenses.Decision]) -> Prepared | tuple:
        index, item, decision = job
        try:
            if item.image_array is not None:
                dec = images.from_array(item.image_array, self.s.effective_min_size)
            else:
                dec = images.decode_image(
                    item.image_bytes or b"", self.s.effective_min_size, self.s.max_pixels
                )
        except images.ImageSkip as e:
            return ("skip", e.reason, f"{item.source_id}: {e}")
        crop = images.resize_center_crop(dec.image, self.s.resolution)
        thumb = None
        if self.need_thumbs:
            thumb = dec.image.copy()
            thumb.thumbnail((CAPTION_THUMB, CAPTION_THUMB), Image.Resampling.BICUBIC)
        pixels = images.to_model_input(crop)
        dec.image = None  # drop the full-size pixels now
        return Prepared(index, item, decision, pixels, thumb, dec)

    def _filter(self, items: list, counts: ChunkCounts) -> Iterator[tuple]:
        for index, item in enumerate(items):
            if isinstance(item, ReadFailure):
                log.warning("input read failure: %s", item.detail)
                counts.skipped[item.reason] += 1
                continue
            if item.skip_reason:
                counts.skipped[item.skip_reason] += 1
                continue
            decision = licenses.decide(item.meta, self.allowed)
            if decision.reject_reason:
                counts.skipped[decision.reject_reason] += 1
                counts.license_rejected[decision.license or decision.reject_reason] += 1
                continue
            if item.caption is None and self.s.caption == "off":
                counts.skipped["missing_caption"] += 1
                continue
            yield index, item, decision

    def encode(
        self, items: list, group: int, chunk: int, key_prefix: str
    ) -> tuple[list[dict], ChunkCounts]:
        """Samples (schema dicts, keys ``{key_prefix}_{item index}``) of a chunk and counts."""
        counts = ChunkCounts()
        samples: list[dict] = []
        batch: list[Prepared] = []
        window = 2 * self.s.batch_size + self.s.decode_threads
        jobs = self._filter(items, counts)
        for n, result in enumerate(bounded_map(self.pool, self._prepare, jobs, window)):
            if isinstance(result, tuple):
                counts.skipped[result[1]] += 1
                log.info("skipped %s", result[2])
            else:
                batch.append(result)
            if len(batch) == self.s.batch_size:
                seed = seed_for(self.s.seed, group, chunk, n)
                samples += self._encode_batch(batch, counts, seed, key_prefix)
                batch = []
        if batch:
            seed = seed_for(self.s.seed, group, chunk, -1)
            samples += self._encode_batch(batch, counts, seed, key_prefix)
        for smp in samples:
            counts.licenses[smp["json"]["license"]] += 1
            counts.caption_origins[smp["json"]["caption_origin"]] += 1
            for r in smp["json"]["repairs"]:
                counts.repaired[r] += 1
        return samples, counts

    def _captions(self, batch: list[Prepared], seed: int) -> list[str | None]:
        mode = self.s.caption
        generated: list[str | None] = [None] * len(batch)
        if mode == "off":
            return generated
        todo = [i for i, p in enumerate(batch) if mode != "missing" or p.item.caption is None]
        bs = self.s.caption_batch_size
        for start in range(0, len(todo), bs):
            idx = todo[start : start + bs]
            texts = self.models.captioner.caption([batch[i].thumb for i in idx], seed + start)
            for i, t in zip(idx, texts, strict=True):
                generated[i] = t or None
        return generated

    def _encode_batch(
        self, batch: list[Prepared], counts: ChunkCounts, seed: int, key_prefix: str
    ) -> list[dict]:
        generated = self._captions(batch, seed)
        keep, captions, origins = [], [], []
        for p, gen in zip(batch, generated, strict=True):
            caption, origin = (gen, "generated") if gen else (p.item.caption, "original")
            if caption is None:
                counts.skipped["empty_generated_caption"] += 1
                continue
            keep.append(p)
            captions.append(caption)
            origins.append(origin)
        if not keep:
            return []
        mean, std = self.models.ae.encode(np.stack([p.pixels for p in keep]))
        arrays = latent_outputs(mean, std, self.s.latent, np.random.default_rng(seed))
        arrays.update(self.models.encode_text(captions))
        out = []
        for i, p in enumerate(keep):
            sample_arrays = {k: v[i] for k, v in arrays.items()}
            if not all(np.isfinite(a).all() for a in sample_arrays.values()):
                counts.skipped["nonfinite_output"] += 1
                continue
            key = f"{key_prefix}_{p.index:05d}"
            sample: dict[str, Any] = {"__key__": key, **sample_arrays, "caption": captions[i]}
            if self.s.caption == "both" and p.item.caption is not None:
                sample["original_caption"] = p.item.caption
            sample["json"] = self._meta(p, origins[i])
            out.append(sample)
        return out

    @staticmethod
    def _meta(p: Prepared, origin: str) -> dict[str, Any]:
        repairs = list(p.item.repairs) + ([p.decoded.repair] if p.decoded.repair else [])
        source_meta = json.loads(json.dumps(p.item.meta, default=str))
        return {
            "source": p.item.source_id,
            "license": p.decision.license,
            "license_raw": p.decision.raw,
            "url": licenses.find_url(p.item.meta),
            "original_width": p.decoded.original_size[0],
            "original_height": p.decoded.original_size[1],
            "original_mode": p.decoded.original_mode,
            "caption_origin": origin,
            "repairs": repairs,
            "source_meta": source_meta,
        }
