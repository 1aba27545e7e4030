"""Dataset manifest schema and shard reader: pure numpy, no torch or webdataset.

The trainer imports exactly this module (and through it ``at1_io.tar_stream``). A dataset is
a root folder (local or s3://) with ``manifest.json``, ``shards/*.tar`` (the training split)
and, when the data stage held one out, ``val/*.tar`` (the validation split,
``Manifest.val_shards``). Each shard is a webdataset tar: members named
``{key}.{field}`` where the key has no dots; fields are ``{array}.npy`` (one array each),
``caption.txt`` (and ``original_caption.txt`` in "both" caption mode) and ``json`` (metadata).

Typical use::

    manifest = load_manifest(open(root + "/manifest.json").read())
    for shard in manifest.shards:
        with open(root + "/" + shard.path, "rb") as f:
            for sample in iter_shard_samples(f, shard.name, manifest):
                sample["latent_mean"], sample["caption"], sample["json"]["license"]
    read = lambda shard: open(root + "/" + shard.path, "rb").read()
    for sample in iter_split_samples(manifest, VAL, read):  # checksums and arrays checked
        ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np

from at1_io.tar_stream import iter_tar_files

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
VAL_SHARD_DIR = "val"
VAL_PROMPTS_PATH = "val_prompts.tar"
TRAIN, VAL = "train", "val"
SPLITS = (TRAIN, VAL)

# Fields that are not arrays.
CAPTION_FIELD = "caption"
ORIGINAL_CAPTION_FIELD = "original_caption"
META_FIELD = "json"
KEY_FIELD = "__key__"

# Array names written by the autoencoder stage.
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"
LATENT_SAMPLE = "latent"


class SchemaError(ValueError):
    """A manifest or shard does not follow this schema."""


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Name, per-sample shape and dtype of one stored array."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    description: str = ""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One complete shard: its path relative to the dataset root, size, checksum and input."""

    name: str
    path: str
    num_samples: int
    sha256: str
    size_bytes: int
    # The input its samples came from (data set root, input tar or table); "" when unknown.
    source: str = ""


@dataclasses.dataclass(frozen=True)
class SplitTotals:
    """Kept samples of one split, by license, source (input) and caption origin; its skips."""

    num_samples: int
    num_shards: int
    licenses: dict[str, int]
    sources: dict[str, int]
    caption_origins: dict[str, int]
    skipped: dict[str, int]


@dataclasses.dataclass
class Manifest:
    """Everything a reader needs to know about a dataset.

    ``shards`` is the training split. ``val_shards`` is the held-out validation split (empty
    when the data stage wrote none). Counts (``licenses``, ``sources``, ...) cover both
    splits; ``splits`` holds them per split (empty in manifests written before splits).
    """

    schema_version: int
    arrays: dict[str, ArraySpec]
    shards: list[ShardInfo]
    autoencoder: dict[str, Any]
    text_encoders: list[dict[str, Any]]
    captioning: dict[str, Any] | None
    settings: dict[str, Any]
    skipped: dict[str, int]
    repaired: dict[str, int]
    licenses: dict[str, int]
    license_rejected: dict[str, int]
    caption_origins: dict[str, int]
    val_prompts: dict[str, Any] | None = None
    val_shards: list[ShardInfo] = dataclasses.field(default_factory=list)
    sources: dict[str, int] = dataclasses.field(default_factory=dict)
    splits: dict[str, SplitTotals] = dataclasses.field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Samples of the training split (``shards``)."""
        return sum(s.num_samples for s in self.shards)

    @property
    def val_num_samples(self) -> int:
        """Samples of the validation split (``val_shards``); 0 without one."""
        return sum(s.num_samples for s in self.val_shards)

    def split_shards(self, split: str) -> list[ShardInfo]:
        """Shards of ``train`` or ``val``."""
        if split not in SPLITS:
            raise SchemaError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        return self.shards if split == TRAIN else self.val_shards

    def totals(self, split: str) -> SplitTotals:
        """Kept-sample counts of one split; counts `{}` (unknown) where the manifest lacks them."""
        shards = self.split_shards(split)
        if split in self.splits:
            return self.splits[split]
        n = sum(s.num_samples for s in shards)
        if split == TRAIN and not self.val_shards:  # every counted sample is a training one
            counts = (self.licenses, self.sources, self.caption_origins, self.skipped)
            return SplitTotals(n, len(shards), *map(dict, counts))
        return SplitTotals(n, len(shards), {}, {}, {}, {})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        d = dataclasses.asdict(self)
        d["arrays"] = {k: {**v, "shape": list(v["shape"])} for k, v in d["arrays"].items()}
        d["num_samples"] = self.num_samples
        d["val_num_samples"] = self.val_num_samples
        return d


def dump_manifest(manifest: Manifest) -> str:
    """Manifest as stable, indented JSON text."""
    return json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"


def _require(d: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise SchemaError(f"{where}: missing field {key!r}")
    if not isinstance(d[key], typ):
        raise SchemaError(f"{where}: field {key!r} has type {type(d[key]).__name__}")
    return d[key]


def _counts(d: dict, key: str, where: str = "manifest") -> dict[str, int]:
    c = _require(d, key, dict, where)
    if not all(isinstance(v, int) for v in c.values()):
        raise SchemaError(f"{where}: {key!r} must map names to integer counts")
    return dict(c)


def _shard_list(items: list, key: str) -> list[ShardInfo]:
    shards = []
    for i, s in enumerate(items):
        where = f"manifest {key[:-1].replace('_', ' ')} #{i}"
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: must be an object, got {type(s).__name__}")
        source = s.get("source", "")
        if not isinstance(source, str):
            raise SchemaError(f"{where}: field 'source' has type {type(source).__name__}")
        shards.append(
            ShardInfo(
                name=_require(s, "name", str, where),
                path=_require(s, "path", str, where),
                num_samples=_require(s, "num_samples", int, where),
                sha256=_require(s, "sha256", str, where),
                size_bytes=_require(s, "size_bytes", int, where),
                source=source,
            )
        )
    return shards


def _splits(d: dict) -> dict[str, SplitTotals]:
    out: dict[str, SplitTotals] = {}
    if "splits" not in d:  # written before the validation split
        return out
    for split, t in _require(d, "splits", dict, "manifest").items():
        where = f"manifest splits[{split!r}]"
        if split not in SPLITS:
            raise SchemaError(f"{where}: unknown split; this reader knows {', '.join(SPLITS)}")
        if not isinstance(t, dict):
            raise SchemaError(f"{where}: must be an object, got {type(t).__name__}")
        out[split] = SplitTotals(
            num_samples=_require(t, "num_samples", int, where),
            num_shards=_require(t, "num_shards", int, where),
            **{
                k: _counts(t, k, where)
                for k in ("licenses", "sources", "caption_origins", "skipped")
            },
        )
    return out


def load_manifest(text: str | bytes) -> Manifest:
    """Parse and validate manifest JSON text."""
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(f"manifest is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise SchemaError("manifest must be a JSON object")
    version = _require(d, "schema_version", int, "manifest")
    if version != SCHEMA_VERSION:
        raise SchemaError(f"manifest schema_version {version}; this reader knows {SCHEMA_VERSION}")
    arrays = {}
    for name, a in _require(d, "arrays", dict, "manifest").items():
        where = f"manifest array {name!r}"
        shape = tuple(_require(a, "shape", list, where))
        if not all(isinstance(n, int) and n > 0 for n in shape):
            raise SchemaError(f"{where}: shape must be positive integers, got {shape}")
        dtype = _require(a, "dtype", str, where)
        try:
            np.dtype(dtype)
        except TypeError as e:
            raise SchemaError(f"{where}: unknown dtype {dtype!r}") from e
        arrays[name] = ArraySpec(name, shape, dtype, a.get("description", ""))
    shards = _shard_list(_require(d, "shards", list, "manifest"), "shards")
    # Manifests written before the validation split have no val_shards: the split is absent.
    val_shards = []
    if "val_shards" in d:
        val_shards = _shard_list(_require(d, "val_shards", list, "manifest"), "val_shards")
    names = [s.name for s in shards + val_shards]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SchemaError(f"manifest: duplicate shard names {dup[:5]} (over shards and val_shards)")
    splits = _splits(d)
    for split, t in splits.items():
        listed = shards if split == TRAIN else val_shards
        if t.num_samples != sum(s.num_samples for s in listed) or t.num_shards != len(listed):
            raise SchemaError(
                f"manifest splits[{split!r}]: {t.num_samples} samples in {t.num_shards} shards, "
                f"but its shard list holds {sum(s.num_samples for s in listed)} in {len(listed)}"
            )
    captioning = d.get("captioning")
    val_prompts = d.get("val_prompts")
    return Manifest(
        schema_version=version,
        arrays=arrays,
        shards=shards,
        autoencoder=_require(d, "autoencoder", dict, "manifest"),
        text_encoders=_require(d, "text_encoders", list, "manifest"),
        captioning=captioning if isinstance(captioning, dict) else None,
        settings=_require(d, "settings", dict, "manifest"),
        skipped=_counts(d, "skipped"),
        repaired=_counts(d, "repaired"),
        licenses=_counts(d, "licenses"),
        license_rejected=_counts(d, "license_rejected"),
        caption_origins=_counts(d, "caption_origins"),
        val_prompts=val_prompts if isinstance(val_prompts, dict) else None,
        val_shards=val_shards,
        sources=_counts(d, "sources") if "sources" in d else {},
        splits=splits,
    )


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes, as the manifest records shard checksums."""
    return hashlib.sha256(data).hexdigest()


def verify_shard_bytes(data: bytes, shard: ShardInfo) -> None:
    """Raise SchemaError unless the shard bytes match the manifest's size and checksum."""
    if len(data) != shard.size_bytes or sha256_bytes(data) != shard.sha256:
        raise SchemaError(f"shard {shard.name}: size or sha256 differs from the manifest")


def iter_split_samples(
    manifest: Manifest, split: str, read: Callable[[ShardInfo], bytes]
) -> Iterator[dict[str, Any]]:
    """Samples of every shard of a split, in manifest order, each shard checked in full.

    ``read(shard)`` returns the shard's bytes (e.g. from ``root + "/" + shard.path``). A shard
    whose size, checksum or sample count differs from the manifest, or a sample that does not
    match the manifest's arrays, is a SchemaError naming the shard: a validation set must not
    shrink silently.
    """
    for shard in manifest.split_shards(split):
        data = read(shard)
        verify_shard_bytes(data, shard)
        n = 0
        for sample in iter_shard_samples(data, shard.name, manifest):
            n += 1
            yield sample
        if n != shard.num_samples:
            raise SchemaError(
                f"shard {shard.name}: holds {n} samples, the manifest says {shard.num_samples}"
            )


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name into (key, field) the webdataset way: at the first dot."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        raise SchemaError(f"member {name!r} has no field extension")
    key, field = base.split(".", 1)
    return key, field


def _decode_field(field: str, data: bytes, where: str) -> tuple[str, Any]:
    try:
        if field.endswith(".npy"):
            return field[: -len(".npy")], np.load(io.BytesIO(data), allow_pickle=False)
        if field.endswith(".txt"):
            return field[: -len(".txt")], data.decode("utf-8")
        if field == "json":
            return META_FIELD, json.loads(data)
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise SchemaError(f"{where}: cannot decode field {field!r}: {e}") from e
    raise SchemaError(f"{where}: unknown field {field!r}")


def validate_sample(sample: dict[str, Any], arrays: dict[str, ArraySpec], shard: str) -> None:
    """Check a decoded sample has every manifest array with the right shape and dtype."""
    where = f"shard {shard} sample {sample.get(KEY_FIELD)!r}"
    for name, spec in arrays.items():
        if name not in sample:
            raise SchemaError(f"{where}: missing array {name!r}")
        a = sample[name]
        if a.shape != spec.shape or a.dtype != np.dtype(spec.dtype):
            raise SchemaError(
                f"{where}: array {name!r} is {a.dtype}{list(a.shape)}, "
                f"manifest says {spec.dtype}{list(spec.shape)}"
            )
    if not isinstance(sample.get(CAPTION_FIELD), str):
        raise SchemaError(f"{where}: missing caption")
    if not isinstance(sample.get(META_FIELD), dict):
        raise SchemaError(f"{where}: missing json metadata")


def iter_shard_samples(
    fileobj: IO[bytes] | bytes,
    shard: str = "<shard>",
    manifest: Manifest | None = None,
    arrays: dict[str, ArraySpec] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield samples of one shard as dicts: ``__key__``, arrays, ``caption``, ``json``.

    With a manifest (or an explicit ``arrays`` spec) every sample is validated against it.
    Members of one sample must be adjacent, as webdataset writes them.
    """
    if isinstance(fileobj, bytes | bytearray):
        fileobj = io.BytesIO(fileobj)
    if arrays is None and manifest is not None:
        arrays = manifest.arrays
    current: dict[str, Any] | None = None
    seen: set[str] = set()

    def finish(s: dict[str, Any]) -> dict[str, Any]:
        if arrays is not None:
            validate_sample(s, arrays, shard)
        return s

    try:
        for member_name, data in iter_tar_files(fileobj):
            key, field = split_member_name(member_name)
            where = f"shard {shard} sample {key!r}"
            name, value = _decode_field(field, data, where)
            if current is None or current[KEY_FIELD] != key:
                if current is not None:
                    yield finish(current)
                if key in seen:
                    raise SchemaError(f"{where}: members of this key are not adjacent")
                seen.add(key)
                current = {KEY_FIELD: key}
            if name in current:
                raise SchemaError(f"{where}: duplicate field {field!r}")
            current[name] = value
    except (tarfile.TarError, EOFError) as e:
        raise SchemaError(f"shard {shard}: unreadable tar: {e}") from e
    if current is not None:
        yield finish(current)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def sample_members(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """Tar members (name, bytes) of one sample dict in the layout iter_shard_samples reads."""
    key = sample[KEY_FIELD]
    if not key or "." in key or "/" in key:
        raise SchemaError(f"sample key {key!r} must be non-empty without dots or slashes")
    members = []
    for name in sorted(k for k in sample if k != KEY_FIELD):
        value = sample[name]
        if isinstance(value, np.ndarray):
            members.append((f"{key}.{name}.npy", _npy_bytes(value)))
        elif name == META_FIELD:
            text = json.dumps(value, sort_keys=True, ensure_ascii=False)
            members.append((f"{key}.json", text.encode("utf-8")))
        elif isinstance(value, str):
            members.append((f"{key}.{name}.txt", value.encode("utf-8")))
        else:
            raise SchemaError(f"sample {key!r}: field {name!r} has type {type(value).__name__}")
    return members


def write_shard(fileobj: IO[bytes], samples: list[dict[str, Any]]) -> None:
    """Write samples as a reproducible webdataset tar (fixed mtime, no owner names)."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for name, data in sample_members(sample):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
