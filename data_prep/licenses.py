"""License normalisation to canonical ids and the allow-list filter."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from at1_io.constants import DEFAULT_ALLOWED_LICENSES

DEFAULT_ALLOWED = DEFAULT_ALLOWED_LICENSES  # defined once for both halves (the trainer's gate)
# Every id normalise() can return; --licenses is checked against this list.
CANONICAL = (
    "cc0",
    "pdm",
    "cc-by",
    "cc-by-sa",
    "cc-by-nd",
    "cc-by-nc",
    "cc-by-nc-sa",
    "cc-by-nc-nd",
    "nkcr",
    "us-gov",
    "all-rights-reserved",
)

# Flickr / YFCC100M license ids (flickr.photos.licenses.getInfo).
FLICKR_IDS = {
    0: "all-rights-reserved",
    1: "cc-by-nc-sa",
    2: "cc-by-nc",
    3: "cc-by-nc-nd",
    4: "cc-by",
    5: "cc-by-sa",
    6: "cc-by-nd",
    7: "nkcr",
    8: "us-gov",
    9: "cc0",
    10: "pdm",
}

# Metadata keys that may hold a license, most specific first (YFCC, LAION, img2dataset).
LICENSE_KEYS = ("license", "license_url", "licenseurl", "license_name", "licensename", "LICENSE")
URL_KEYS = ("url", "URL", "photo_url", "downloadurl", "image_url", "source_url")

_NAMES = {
    "cc0": "cc0",
    "cc zero": "cc0",
    "public domain dedication": "cc0",
    "public domain dedication (cc0)": "cc0",
    "publicdomain zero": "cc0",
    "public domain mark": "pdm",
    "pdm": "pdm",
    "public domain": "pdm",
    "no known copyright restrictions": "nkcr",
    "united states government work": "us-gov",
    "all rights reserved": "all-rights-reserved",
}
_CC_PARTS = {"by", "sa", "nc", "nd"}
_CC_WORDS = {
    "attribution": "by",
    "sharealike": "sa",
    "share alike": "sa",
    "noncommercial": "nc",
    "non commercial": "nc",
    "noderivs": "nd",
    "noderivatives": "nd",
    "no derivatives": "nd",
}
_URL_RE = re.compile(r"creativecommons\.org/(licenses|publicdomain)/([a-z0-9-]+)")


def _cc_id(parts: list[str]) -> str | None:
    parts = [p for p in parts if p]
    if not parts or parts[0] != "by" or not set(parts) <= _CC_PARTS:
        return None
    order = [p for p in ("by", "nc", "nd", "sa") if p in parts]
    if "nc" in order and "sa" in order:
        return "cc-by-nc-sa"
    if "nc" in order and "nd" in order:
        return "cc-by-nc-nd"
    if "nd" in order and "sa" in order:
        return None
    return "cc-" + "-".join(order)


def normalise(raw: Any) -> str | None:
    """Canonical license id for a license name, URL, or Flickr id; None if unrecognised."""
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return FLICKR_IDS.get(raw)
    text = str(raw).strip().lower()
    if not text:
        return None
    if text.isdigit():
        return FLICKR_IDS.get(int(text))
    m = _URL_RE.search(text)
    if m:
        kind, code = m.groups()
        if kind == "publicdomain":
            return {"zero": "cc0", "mark": "pdm"}.get(code)
        return _cc_id(code.split("-"))
    text = re.sub(r"\s+", " ", text.replace("_", " ")).strip(" .")
    text = re.sub(r"\b(license|licence)\b", "", text).strip()
    text = re.sub(r"[\s-]+\d+(\.\d+)?\s*(international|generic|unported)?$", "", text).strip()
    if text in _NAMES:
        return _NAMES[text]
    if text.startswith("cc0"):
        return "cc0"
    if text.startswith("cc "):  # "cc by-sa", "cc by nc"
        return _cc_id(re.split(r"[\s-]+", text[3:]))
    if text.startswith("cc-"):
        return _cc_id(text[3:].split("-"))
    words = [w.strip() for w in re.split(r"[-,]", text)]
    codes = [_CC_WORDS.get(w) for w in words]
    if codes and all(codes):
        return _cc_id(codes)
    return None


def parse_allowed(spec: str) -> frozenset[str] | None:
    """Parse a --licenses value: comma list of canonical ids, or 'any' for no filter."""
    if spec.strip().lower() == "any":
        return None
    ids = frozenset(s.strip().lower() for s in spec.split(",") if s.strip())
    unknown = sorted(ids - set(CANONICAL))
    if unknown or not ids:
        raise ValueError(f"--licenses: unknown ids {unknown}; choose from {', '.join(CANONICAL)}")
    return ids


@dataclasses.dataclass(frozen=True)
class Decision:
    """Outcome for one sample: kept license id, or the rejection reason."""

    license: str | None
    raw: str | None
    reject_reason: str | None


def find_license(meta: dict[str, Any]) -> Any:
    """The first non-empty license-like field in a metadata dict."""
    for key in LICENSE_KEYS:
        value = meta.get(key)
        if value not in (None, ""):
            return value
    return None


def find_url(meta: dict[str, Any]) -> str | None:
    """The source URL of a sample, if its metadata has one."""
    for key in URL_KEYS:
        value = meta.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def decide(meta: dict[str, Any], allowed: frozenset[str] | None) -> Decision:
    """Normalise a sample's license and decide whether the allow-list keeps it."""
    raw = find_license(meta)
    raw_text = None if raw is None else str(raw)
    lic = normalise(raw)
    if allowed is None:
        return Decision(lic or "unknown", raw_text, None)
    if raw is None:
        return Decision(None, None, "license_missing")
    if lic is None:
        return Decision(None, raw_text, "license_unknown")
    if lic not in allowed:
        return Decision(lic, raw_text, "license_not_allowed")
    return Decision(lic, raw_text, None)
