"""What every input reader yields and shares: items, failures, errors, group digests, captions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

CAPTION_KEYS = ("caption", "text", "TEXT", "title")


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


def parse_meta(data: bytes, repairs: list[str]) -> dict[str, Any]:
    try:
        meta = json.loads(data.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        repairs.append("metadata_unreadable")
        return {}
    if not isinstance(meta, dict):
        repairs.append("metadata_unreadable")
        return {}
    return meta


def caption_from_meta(meta: dict[str, Any], repairs: list[str]) -> str | None:
    for k in CAPTION_KEYS:
        if isinstance(meta.get(k), str | bytes):
            return decode_caption(meta[k], repairs)
    return None


def jsonable(value: Any) -> Any:
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
