"""Local and s3:// paths through fsspec, with complete-or-absent writes."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import uuid
from typing import Any

import fsspec


class StorageError(RuntimeError):
    """A path or endpoint that cannot be used; raised before any work starts."""


def is_s3(url: str) -> bool:
    """True for s3:// URLs."""
    return url.startswith("s3://")


def s3_options() -> dict[str, Any]:
    """s3fs options from the environment: endpoint from AWS_ENDPOINT_URL, short timeouts.

    Credentials are left to botocore's own environment lookup so they are never copied
    into objects that might be printed.
    """
    client_kwargs = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    return {
        "client_kwargs": client_kwargs,
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}},
        # Shard completion is checked by listing: never trust a cached listing.
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }


_S3_CACHE: dict[str, fsspec.AbstractFileSystem] = {}


def _s3_fs() -> fsspec.AbstractFileSystem:
    # One client per distinct environment: creating one costs ~0.1 s, and tests change env.
    env = os.environ
    names = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    key = hashlib.sha256(repr([env.get(n) for n in names]).encode()).hexdigest()
    if key not in _S3_CACHE:
        _S3_CACHE[key] = fsspec.filesystem("s3", **s3_options())
    return _S3_CACHE[key]


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and bare path for a local path or s3:// URL."""
    if is_s3(url):
        return _s3_fs(), url[len("s3://") :].rstrip("/")
    return fsspec.filesystem("file"), os.path.abspath(url)


def join(root: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with forward slashes."""
    if is_s3(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return os.path.join(root, *parts)


def check_s3_reachable(url: str) -> None:
    """Raise StorageError naming the endpoint if the bucket of an s3:// URL can't be reached."""
    fs, path = get_fs(url)
    bucket = path.split("/", 1)[0]
    endpoint = s3_options()["client_kwargs"].get("endpoint_url", "default AWS endpoint")
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError as e:
        raise StorageError(f"S3 bucket {bucket!r} not found at {endpoint}") from e
    except PermissionError as e:
        raise StorageError(f"S3 access denied for bucket {bucket!r} at {endpoint}: {e}") from e
    except Exception as e:  # botocore raises many connection error types
        raise StorageError(
            f"S3 endpoint {endpoint} unreachable for {url}: {type(e).__name__}: {e}"
        ) from e


def exists(url: str) -> bool:
    """True if a file exists at the local path or URL."""
    fs, path = get_fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    """Whole file contents."""
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_many(urls: list[str]) -> list[bytes]:
    """Contents of many files, fetched concurrently on S3 (s3fs batches ``cat``)."""
    if not urls:
        return []
    fs, _ = get_fs(urls[0])
    paths = [get_fs(u)[1] for u in urls]
    found = fs.cat(paths)
    return [found[p] for p in paths]


def list_files(url: str, pattern: str = "*") -> list[str]:
    """Sorted full paths/URLs of files matching a glob pattern inside a folder."""
    fs, path = get_fs(url)
    sep = "/" if is_s3(url) else os.sep
    found = fs.glob(path + sep + pattern, detail=True)  # one listing, no per-file requests
    prefix = "s3://" if is_s3(url) else ""
    return sorted(prefix + p for p, info in found.items() if info.get("type") == "file")


# The hidden temp name a local write uses beside its target; a killed process leaves these.
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{32}\.tmp$")


def _complete_or_absent(path: str, write) -> None:
    """Runs `write(tmp)` on a hidden temp name beside `path`, then renames it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def get_file(url: str, local_path: str) -> None:
    """Download ``url`` to ``local_path``, which appears only once complete."""
    fs, path = get_fs(url)
    _complete_or_absent(local_path, lambda tmp: fs.get_file(path, tmp))


def put_file(local_path: str, url: str) -> None:
    """Publish a finished local file at ``url``: it appears only once complete.

    Locally by copying to a hidden temp name beside the target and renaming; on S3 an
    object becomes visible only when its (multipart) upload completes.
    """
    fs, path = get_fs(url)
    if is_s3(url):
        fs.put_file(local_path, path)
        return
    _complete_or_absent(path, lambda tmp: shutil.copyfile(local_path, tmp))


def remove(url: str) -> None:
    """Delete a file if it exists."""
    fs, path = get_fs(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def put_bytes(data: bytes, url: str, tmp_dir: str) -> None:
    """Publish bytes at ``url`` with the same complete-or-absent rule as put_file."""
    local = os.path.join(tmp_dir, f"put-{uuid.uuid4().hex}")
    with open(local, "wb") as f:
        f.write(data)
    try:
        put_file(local, url)
    finally:
        os.remove(local)
