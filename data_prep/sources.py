"""Input readers: image folder, img2dataset tars (`tar_source`), parquet/JSONL table, tfds.

Each source splits its items into deterministic *groups*; a worker processes whole groups
and each group becomes one or more output shards. Flat sources (folder, table, tfds) use
groups of ``shard_size`` items; tar sources use one group per input tar. ``origin(g)`` names
the input a group comes from (the data set root, or the input tar), for provenance counts.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator

from at1_io import storage
from data_prep.input_items import (
    RawSample,
    ReadFailure,
    SourceError,
    caption_from_meta,
    decode_caption,
    digest,
    jsonable,
    parse_meta,
)
from data_prep.tar_source import TarSource

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filepath", "filename")


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
            meta = parse_meta(meta_bytes, repairs) if meta_bytes is not None else {}
            caption = decode_caption(_read_optional(self.fs, stem + ".txt"), repairs)
            if caption is None:
                caption = caption_from_meta(meta, repairs)
            data = _read_optional(self.fs, path)
            # Listed but gone when read (deleted since, or a dangling symlink): not an empty file.
            skip = None if data is not None else "missing_image_file"
            yield RawSample(rel, data, None, caption, meta, repairs, skip)


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
            meta = {k: jsonable(v) for k, v in row.items() if k != self.image_column}
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
                k: jsonable(v)
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
