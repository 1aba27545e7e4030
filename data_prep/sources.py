"""Input readers: image folder, img2dataset tars, parquet/JSONL table, tfds data_source.

Each source splits its items into deterministic *groups*; a worker processes whole groups
and each group becomes one or more output shards. Flat sources (folder, table, tfds) use
groups of ``shard_size`` items; tar sources use one group per input tar. ``origin(g)`` names
the input a group comes from (the data set root, or the input tar), for provenance counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from at1_io import storage

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_KEYS = ("caption", "text", "TEXT", "title")
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filepath", "filename")


class SourceError(RuntimeError):
    """An input that cannot be read at all; raised before any work starts."""


@dataclasses.dataclass
class RawSample:
    """One input item before decoding: image bytes (or array), caption, metadata."""

    source_id: str
    image_bytes: bytes | None = None
    image_array: np.ndarray | None = None
    caption: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    repairs: list[str] = dataclasses.field(default_factory=list)
    skip_reason: str | None = None  # set when the item is known bad before decoding


@dataclasses.dataclass
class ReadFailure:
    """A group that ended early (e.g. a truncated tar); counted as a skip with ``reason``."""

    reason: str
    detail: str


def decode_caption(data: bytes | str | None, repairs: list[str]) -> str | None:
    """Caption text with whitespace cleaned; non-UTF-8 bytes are repaired as cp1252/latin-1."""
    if data is None:
        return None
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            repairs.append("caption_non_utf8")
            try:
                text = data.decode("cp1252")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
    else:
        text = str(data)
    text = " ".join(text.split())
    return text or None


def _parse_meta(data: bytes, repairs: list[str]) -> dict[str, Any]:
    try:
        meta = json.loads(data.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        repairs.append("metadata_unreadable")
        return {}
    if not isinstance(meta, dict):
        repairs.append("metadata_unreadable")
        return {}
    return meta


def _caption_from_meta(meta: dict[str, Any], repairs: list[str]) -> str | None:
    for k in CAPTION_KEYS:
        if isinstance(meta.get(k), str | bytes):
            return decode_caption(meta[k], repairs)
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else None
    if isinstance(value, float) and value != value:  # NaN from pandas-less parquet nulls
        return None
    return value


def digest(obj: Any) -> str:
    """sha256 of a JSON-able value (a group's item list): equal lists, equal digests."""
    text = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def input_label(url: str) -> str:
    """An input as provenance names it: s3:// URLs as given, local paths made absolute."""
    return url.rstrip("/") if storage.is_s3(url) else os.path.abspath(url)


def _read_optional(fs, path: str) -> bytes | None:
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


class FolderSource:
    """Images under a folder (recursive) with optional sidecar ``.txt`` / ``.json``."""

    kind = "folder"

    def __init__(self, root: str, shard_size: int):
        self.fs, self.path = storage.get_fs(root)
        if not self.fs.isdir(self.path):
            if self.fs.exists(self.path):
                raise SourceError(_file_given(root))
            raise SourceError(f"input folder not found: {root}")
        listing = self.fs.find(self.path, detail=True)
        files = sorted(p for p in listing if p.lower().endswith(IMAGE_EXTS))
        if not files:
            raise SourceError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
        self.files, self.shard_size = files, shard_size
        self.sizes = {p: info.get("size") for p, info in listing.items()}
        self.label = input_label(root)

    def num_groups(self) -> int:
        """Number of groups."""
        return -(-len(self.files) // self.shard_size)

    def group_size(self, g: int) -> int | None:
        """Items in group g (None if unknown before reading)."""
        return len(self.files[g * self.shard_size : (g + 1) * self.shard_size])

    def origin(self, g: int) -> str:
        """The input folder."""
        return self.label

    def fingerprint(self, g: int) -> str:
        """Digest of group g's file names and sizes (images and their sidecars)."""
        rows = []
        for path in self.files[g * self.shard_size : (g + 1) * self.shard_size]:
            stem = os.path.splitext(path)[0]
            sizes = [self.sizes.get(p) for p in (path, stem + ".txt", stem + ".json")]
            rows.append([posixpath.relpath(path, self.path), *sizes])
        return digest(rows)

    def iter_group(self, g: int) -> Iterator[RawSample | ReadFailure]:
        """Items of group g in order."""
        for path in self.files[g * self.shard_size : (g + 1) * self.shard_size]:
            rel = posixpath.relpath(path, self.path)
            stem = os.path.splitext(path)[0]
            repairs: list[str] = []
            meta_bytes = _read_optional(self.fs, stem + ".json")
            meta = _parse_meta(meta_bytes, repairs) if meta_bytes is not None else {}
            caption = decode_caption(_read_optional(self.fs, stem + ".txt"), repairs)
            if caption is None:
                caption = _caption_from_meta(meta, repairs)
            data = _read_optional(self.fs, path)
            # Listed but gone when read (deleted since, or a dangling symlink): not an empty file.
            skip = None if data is not None else "missing_image_file"
            yield RawSample(rel, data, None, caption, meta, repairs, skip)


class NoEndBlock(tarfile.ReadError):
    """A tar whose members stop before its end-of-archive block (cut short or overwritten)."""


def _tar_failure(err: Exception, found: bool) -> str:
    """Skip reason of a tar that failed: empty, not a tar at all, or damaged after samples."""
    if str(err) == "empty file":  # tarfile's message for a zero-byte file
        return "empty_input_tar"
    if not found and not isinstance(err, NoEndBlock):
        return "corrupt_input_tar"
    return "truncated_input_tar"


class TarSource:
    """img2dataset / webdataset tars: members ``{key}.{jpg,png,webp}``, ``.txt``, ``.json``."""

    kind = "tars"

    def __init__(self, url: str):
        fs, path = storage.get_fs(url)
        if fs.isdir(path):
            listing = fs.find(path, detail=True)
        elif fs.exists(path):
            listing = {path: fs.info(path)}
        else:
            listing = fs.glob(path, detail=True)
        tars = sorted(p for p in listing if p.endswith(".tar"))
        if not tars:
            raise SourceError(f"no .tar files at {url}")
        self.fs, self.tars = fs, tars
        self.sizes = {p: listing[p].get("size") for p in tars}
        self.prefix = "s3://" if storage.is_s3(url) else ""

    def num_groups(self) -> int:
        """One group per input tar."""
        return len(self.tars)

    def group_size(self, g: int) -> int | None:
        """Unknown until the tar is read."""
        return None

    def origin(self, g: int) -> str:
        """Input tar g."""
        return self.prefix + self.tars[g]

    def fingerprint(self, g: int) -> str:
        """Digest of tar g's name and size."""
        return digest([posixpath.basename(self.tars[g]), self.sizes[self.tars[g]]])

    def iter_group(self, g: int) -> Iterator[RawSample | ReadFailure]:
        """Whole samples of tar g; a damaged tar ends with a ReadFailure."""
        # A sample is whole once the header of another key's member follows it, or the tar's
        # end-of-archive block does. A cut or corrupt tar drops the sample it was reading (a
        # partial_sample item: it may have lost its caption or license fields).
        name = posixpath.basename(self.tars[g])
        current: dict[str, bytes] = {}
        key = None  # key of the sample being read
        found = False
        try:
            with self.fs.open(self.tars[g], "rb") as f:
                # Random access mode: after the last member the end block can be checked.
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for member in tar:
                        base = posixpath.basename(member.name)
                        if not member.isfile() or "." not in base or base.startswith("."):
                            continue
                        mkey = posixpath.join(posixpath.dirname(member.name), base.split(".")[0])
                        if mkey != key and current:
                            yield self._sample(name, key, current)
                            current = {}
                        key, found = mkey, True
                        current[base.split(".", 1)[1].lower()] = tar.extractfile(member).read()
                    f.seek(tar.offset)
                    end = f.read(tarfile.BLOCKSIZE)
                    if end != bytes(tarfile.BLOCKSIZE):
                        what = "ends" if len(end) < tarfile.BLOCKSIZE else "has no tar header"
                        raise NoEndBlock(f"{what} at byte {tar.offset}, before its end block")
        except (tarfile.TarError, EOFError) as e:
            if key is not None:
                yield RawSample(f"{name}/{key}", skip_reason="partial_sample")
            yield ReadFailure(_tar_failure(e, found), f"{name}: {e}")
            return
        if current:
            yield self._sample(name, key, current)
        elif not found:
            yield ReadFailure("empty_input_tar", f"{name}: no samples")

    @staticmethod
    def _sample(tar_name: str, key: str, fields: dict[str, bytes]) -> RawSample:
        repairs: list[str] = []
        meta = _parse_meta(fields["json"], repairs) if "json" in fields else {}
        caption = decode_caption(fields.get("txt"), repairs)
        if caption is None:
            caption = _caption_from_meta(meta, repairs)
        image = next((fields[e] for e in ("jpg", "jpeg", "png", "webp") if e in fields), None)
        skip = None if image is not None else "missing_image_file"
        return RawSample(f"{tar_name}/{key}", image, None, caption, meta, repairs, skip)


def _read_parquet(f, url: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(f).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{url}: not a readable parquet table ({e})") from e


def _read_jsonl(f, url: str) -> list[dict]:
    try:
        text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{url}: not UTF-8 text ({e}); save the table as UTF-8") from e
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{url} line {n}: not valid JSON ({e.msg}, column {e.colno})") from e
        if not isinstance(row, dict):
            raise SourceError(
                f"{url} line {n}: a row must be a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
    return rows


class TableSource:
    """A parquet or JSONL table with a column of image paths (relative to the table)."""

    kind = "table"

    def __init__(self, url: str, shard_size: int, image_column: str | None, caption_column: str):
        fs, path = storage.get_fs(url)
        if not fs.exists(path):
            raise SourceError(f"input table not found: {url}")
        with fs.open(path, "rb") as f:
            rows = _read_parquet(f, url) if path.endswith(".parquet") else _read_jsonl(f, url)
        if not rows:
            raise SourceError(f"input table is empty: {url}")
        cols = rows[0].keys()
        self.image_column = image_column or next((c for c in IMAGE_COLUMNS if c in cols), None)
        if self.image_column not in cols:
            raise SourceError(
                f"table {url} has no image column (tried {image_column or IMAGE_COLUMNS})"
            )
        self.caption_column, self.label = caption_column, input_label(url)
        self.fs, self.base, self.rows, self.shard_size = (
            fs,
            posixpath.dirname(path),
            rows,
            shard_size,
        )

    def num_groups(self) -> int:
        """Number of groups."""
        return -(-len(self.rows) // self.shard_size)

    def group_size(self, g: int) -> int | None:
        """Items in group g."""
        return len(self.rows[g * self.shard_size : (g + 1) * self.shard_size])

    def origin(self, g: int) -> str:
        """The input table."""
        return self.label

    def fingerprint(self, g: int) -> str:
        """Digest of group g's rows."""
        return digest(self.rows[g * self.shard_size : (g + 1) * self.shard_size])

    def iter_group(self, g: int) -> Iterator[RawSample | ReadFailure]:
        """Rows of group g in order, with their image files read."""
        start = g * self.shard_size
        for i, row in enumerate(self.rows[start : start + self.shard_size], start):
            repairs: list[str] = []
            ref = str(row.get(self.image_column) or "")
            if ref.startswith("s3://"):
                fs, path = storage.get_fs(ref)
            else:
                fs, path = self.fs, ref if posixpath.isabs(ref) else posixpath.join(self.base, ref)
            data = _read_optional(fs, path) if ref else None
            meta = {k: _jsonable(v) for k, v in row.items() if k != self.image_column}
            caption = decode_caption(row.get(self.caption_column), repairs)
            skip = None if data is not None else "missing_image_file"
            yield RawSample(f"row{i}:{ref}", data, None, caption, meta, repairs, skip)


class TfdsSource:
    """A tensorflow_datasets dataset through ``tfds.data_source`` (array_record, no TF)."""

    kind = "tfds"

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None,
        shard_size: int,
        image_column: str | None,
        caption_column: str,
    ):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise SourceError("tfds input needs the tensorflow-datasets package") from e
        try:
            self.ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises assorted errors for a missing dataset
            raise SourceError(f"tfds dataset {name!r} split {split!r} not readable: {e}") from e
        self.name, self.split, self.shard_size = name, split, shard_size
        self.image_column, self.caption_column = image_column or "image", caption_column

    def num_groups(self) -> int:
        """Number of groups."""
        return -(-len(self.ds) // self.shard_size)

    def group_size(self, g: int) -> int | None:
        """Items in group g."""
        return min(self.shard_size, len(self.ds) - g * self.shard_size)

    def origin(self, g: int) -> str:
        """The tfds data set and split."""
        return f"tfds:{self.name} split {self.split}"

    def fingerprint(self, g: int) -> str:
        """Digest of the dataset, split, length and group g's index range."""
        start = g * self.shard_size
        return digest([self.name, self.split, len(self.ds), start, start + self.group_size(g)])

    def iter_group(self, g: int) -> Iterator[RawSample | ReadFailure]:
        """Records of group g, images as arrays."""
        start = g * self.shard_size
        for i in range(start, min(start + self.shard_size, len(self.ds))):
            repairs: list[str] = []
            rec = self.ds[i]
            image = rec.get(self.image_column)
            meta = {
                k: _jsonable(v)
                for k, v in rec.items()
                if k not in (self.image_column, self.caption_column)
            }
            caption = decode_caption(rec.get(self.caption_column), repairs)
            skip = None if image is not None else "missing_image_file"
            yield RawSample(f"{self.name}[{i}]", None, image, caption, meta, repairs, skip)


def _file_given(url: str) -> str:
    return (
        f"input {url} is a file, not an image folder, .tar or table (.parquet/.jsonl): "
        "give the folder that holds the images"
    )


def open_source(
    url: str,
    fmt: str,
    shard_size: int,
    image_column: str | None = None,
    caption_column: str = "caption",
    split: str = "train",
    tfds_data_dir: str | None = None,
):
    """Open an input by format (``auto`` guesses from the URL); SourceError if unusable."""
    if fmt == "auto":
        if url.startswith("tfds:"):
            fmt = "tfds"
        elif url.endswith((".parquet", ".jsonl", ".json")):
            fmt = "table"
        elif url.endswith(".tar") or "*" in url:
            fmt = "tars"
        else:
            fs, path = storage.get_fs(url)
            if not fs.exists(path):
                raise SourceError(f"input path not found: {url}")
            if not fs.isdir(path):
                raise SourceError(_file_given(url))
            has_tars = any(p.endswith(".tar") for p in fs.find(path))
            fmt = "tars" if has_tars else "folder"
    if fmt == "tfds":
        name = url.removeprefix("tfds:")
        return TfdsSource(name, split, tfds_data_dir, shard_size, image_column, caption_column)
    if not url.startswith("s3://") and "*" not in url and not os.path.exists(url):
        raise SourceError(f"input path not found: {url}")
    if fmt == "table":
        return TableSource(url, shard_size, image_column, caption_column)
    if fmt == "tars":
        return TarSource(url)
    if fmt == "folder":
        return FolderSource(url, shard_size)
    raise SourceError(f"unknown input format {fmt!r}")
