"""Teach orbax-checkpoint 0.12 to write s3:// checkpoints (any S3-compatible endpoint).

As shipped, orbax turns `s3://b/p` into `s3:/b/p` when it builds TensorStore specs and
then rejects it as a relative path (google/orbax#359), and it treats a step folder on S3
as complete by name alone (atomic-rename semantics, which object stores do not have).
This module, the only one that touches orbax internals, routes:
- array data to TensorStore's `s3` kvstore driver (endpoint and region from the
  environment, which TensorStore itself ignores for the endpoint);
- orbax's own metadata files through etils.epath → fsspec/s3fs (honours AWS_ENDPOINT_URL);
- atomicity through orbax's CommitFileTemporaryPath: a step is complete only once its
  `commit_success.txt` exists, written last.
Credentials stay in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/...).
Tested with orbax-checkpoint 0.12.4 (pyproject pins <0.13).
"""

from __future__ import annotations

import os
import re

from etils import epath
from orbax.checkpoint._src.path import atomicity, atomicity_defaults
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

_S3_RE = re.compile(r"^s3:/+([^/]+)/?(.*)$")
_installed = False
_original = {}


def is_s3(path) -> bool:
    return str(path).startswith("s3:/")


def s3_path(url: str) -> epath.Path:
    return epath.Path(url)


def split(url: str) -> tuple[str, str]:
    """('bucket', 'key/prefix') of `s3://bucket/key/prefix` (also the mangled `s3:/…`)."""
    m = _S3_RE.match(str(url))
    if not m:
        raise ValueError(f"{url} is not an s3://bucket/prefix URL")
    return m.group(1), m.group(2).strip("/")


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def kvstore_spec(url: str, folder: bool = True) -> dict:
    """TensorStore's s3 kvstore spec for a folder (path ends with '/') or a single object.

    An object key ending in '/' is a folder marker to some S3 servers (SeaweedFS keeps no
    content for it), so single files must not get the slash.
    """
    bucket, key = split(url)
    spec = {
        "driver": "s3",
        "bucket": bucket,
        "path": f"{key}/" if key and folder else key,
        "aws_region": os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        # Read keys from the environment only; this also silences ~/.aws/config lookups.
        "aws_credentials": {"type": "environment"},
    }
    if endpoint():
        spec["endpoint"] = endpoint()
    return spec


def _build_kvstore_tspec(
    directory, name=None, *, use_ocdbt=True, process_id=None, replica_separate_folder=False
):
    if not is_s3(directory):
        return _original["build_kvstore_tspec"](
            directory,
            name,
            use_ocdbt=use_ocdbt,
            process_id=process_id,
            replica_separate_folder=replica_separate_folder,
        )
    bucket, key = split(directory)
    if not use_ocdbt:  # orbax then addresses one file: a JSON blob such as _sharding
        path = "/".join(p for p in (key, name) if p)
        return kvstore_spec(f"s3://{bucket}/{path}", folder=False)
    if process_id is not None:
        sub = ts_utils.PROCESS_SUBDIR_PREFIX
        if replica_separate_folder:
            sub += ts_utils.REPLICA_SUBDIR_SUFFIX
        key = "/".join(p for p in (key, f"{sub}{process_id}") if p)
    spec = {
        "driver": "ocdbt",
        "base": kvstore_spec(f"s3://{bucket}/{key}"),
        "cache_pool": "cache_pool#ocdbt",
    }
    if name is not None:
        spec["path"] = name
    return spec


def commit_file_path_class():
    return atomicity.CommitFileTemporaryPath


def _default_class(original_name):
    def choose(path, *args, **kwargs):
        if is_s3(path):
            return atomicity.CommitFileTemporaryPath
        return _original[original_name](path, *args, **kwargs)

    return choose


def refresh_clients() -> None:
    """Forget cached s3fs clients so a changed AWS_* environment (endpoint, keys) is used."""
    import s3fs
    from etils.epath import backend

    s3fs.S3FileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()  # etils keeps its own cache


def install() -> None:
    """Patch orbax (idempotent): s3 kvstore specs and commit-file atomicity for s3:// paths."""
    global _installed
    if _installed:
        return
    _original["build_kvstore_tspec"] = ts_utils.build_kvstore_tspec
    ts_utils.build_kvstore_tspec = _build_kvstore_tspec
    for name in ("get_default_temporary_path_class", "get_item_default_temporary_path_class"):
        _original[name] = getattr(atomicity_defaults, name)
        setattr(atomicity_defaults, name, _default_class(name))
    _installed = True
