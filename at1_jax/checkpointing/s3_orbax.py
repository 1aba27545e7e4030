"""Teach orbax-checkpoint 0.12 to write s3:// checkpoints (any S3-compatible endpoint).

As shipped, orbax turns `s3://b/p` into `s3:/b/p` when it builds TensorStore specs and
then rejects it as a relative path (google/orbax#359), and it treats a step folder on S3
as complete by name alone (atomic-rename semantics, which object stores do not have).
This module, the only one that touches orbax internals, routes:
- array data to TensorStore's `s3` kvstore driver (endpoint and region from the
  environment, which TensorStore itself ignores for the endpoint), with the retry budget
  of `retries.RetryPolicy` in its context (its default retries for ~15 minutes);
- orbax's own metadata files through etils.epath → fsspec/s3fs (honours AWS_ENDPOINT_URL),
  on an s3fs filesystem whose requests retry within the same budget, one log line per retry;
- atomicity through orbax's CommitFileTemporaryPath: a step is complete only once its
  `commit_success.txt` exists, written last;
- orbax's process barriers through `coordination.barrier` (deadline, and stops when any
  process reports a failed save) instead of collectives that wait forever.
Credentials stay in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/...).
Tested with orbax-checkpoint 0.12.4 (pyproject pins <0.13).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re

from etils import epath
from etils.epath import backend
from orbax.checkpoint._src.multihost import multihost
from orbax.checkpoint._src.path import atomicity, atomicity_defaults
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from at1_jax.checkpointing import coordination, retries

_S3_RE = re.compile(r"^s3:/+([^/]+)/?(.*)$")
_installed = {"s3": False, "barriers": False}
_original = {}
_policy = retries.RetryPolicy()


def configure(policy: retries.RetryPolicy) -> None:
    """The retry budget of S3 requests made from now on (process-wide)."""
    global _policy
    _policy = policy


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
        "context": _policy.tensorstore_context(),
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


def _retryable(error: BaseException) -> bool:
    """Connection errors, timeouts and 5xx answers: the server may come back."""
    import aiohttp
    import botocore.exceptions as boto

    transient = (
        boto.ConnectionError,
        boto.HTTPClientError,
        aiohttp.ClientError,
        ConnectionError,
        TimeoutError,
    )
    seen, visited = error, set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, transient):
            return True
        response = getattr(seen, "response", None) or {}
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if status >= 500:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@functools.cache
def _retrying_filesystem_class():
    import s3fs
    from fsspec.asyn import sync_wrapper

    class RetryingS3FileSystem(s3fs.S3FileSystem):
        """s3fs whose every request retries within the `configure`d budget, then names the URL."""

        retries = 1  # s3fs's own loop: one try, ours retries

        async def _call_s3(self, method, *akwarglist, **kwargs):
            key = kwargs.get("Key") or kwargs.get("Prefix") or ""
            what = f"S3 {method} s3://{kwargs.get('Bucket', '')}/{key} at {endpoint()}"
            call = super()._call_s3
            try:
                return await retries.retry_async(
                    lambda: call(method, *akwarglist, **kwargs),
                    _policy,
                    what,
                    _retryable,
                    abandon=coordination.failure,
                )
            except retries.StorageUnavailable as e:
                coordination.report_failure(str(e))
                raise

        # s3fs's synchronous twin (used by its file objects) wraps the base class method.
        call_s3 = sync_wrapper(_call_s3)

    return RetryingS3FileSystem


def read_timeout(policy: retries.RetryPolicy) -> float:
    """Seconds one S3 request may wait for an answer: 60, or the retry budget if shorter."""
    # A request to a server that died mid-request (a proxy still holding the connection)
    # waits this long: with botocore's 60 s, a 2 s budget kept a process alive for a minute.
    return max(5.0, min(60.0, policy.seconds))


@functools.cache
def _checkpoint_filesystem(environment: str, timeout_s: float):
    del environment  # the cache key: AWS_* variables are read when the client is made
    return _retrying_filesystem_class()(
        skip_instance_cache=True,
        config_kwargs={
            "connect_timeout": min(5.0, timeout_s),
            "read_timeout": timeout_s,
            "retries": {"total_max_attempts": 1},  # botocore's: one try, ours retries
        },
    )


def _aws_environment() -> str:
    names = sorted(k for k in os.environ if k.startswith("AWS_"))
    return hashlib.sha256(repr([(k, os.environ[k]) for k in names]).encode()).hexdigest()


def _etils_filesystem(name: str):
    """etils.epath's filesystem for a protocol: ours for s3, etils' own otherwise."""
    if name == "s3":
        return _checkpoint_filesystem(_aws_environment(), read_timeout(_policy))
    return _original["etils_filesystem"](name)


def refresh_clients() -> None:
    """Forget cached s3fs clients so a changed AWS_* environment (endpoint, keys) is used."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    _checkpoint_filesystem.cache_clear()
    type(backend.fsspec_backend)._get_filesystem.cache_clear()  # etils keeps its own cache


def _sync_global_processes(name: str, *, timeout: int | None = None, **_):
    # Over all processes: Checkpoints never gives orbax a subset (`active_processes`).
    coordination.barrier(name, timeout or multihost.coordination_timeout())


def install_barriers() -> None:
    """Route orbax's process barriers through `coordination` (idempotent)."""
    if _installed["barriers"]:
        return
    _original["sync_global_processes"] = multihost.sync_global_processes
    multihost.sync_global_processes = _sync_global_processes
    _installed["barriers"] = True


def install() -> None:
    """Patch orbax (idempotent): s3 kvstore specs, commit-file atomicity, retrying s3fs."""
    install_barriers()
    if _installed["s3"]:
        return
    _original["build_kvstore_tspec"] = ts_utils.build_kvstore_tspec
    ts_utils.build_kvstore_tspec = _build_kvstore_tspec
    for name in ("get_default_temporary_path_class", "get_item_default_temporary_path_class"):
        _original[name] = getattr(atomicity_defaults, name)
        setattr(atomicity_defaults, name, _default_class(name))
    _original["etils_filesystem"] = backend.fsspec_backend._get_filesystem
    backend.fsspec_backend._get_filesystem = _etils_filesystem  # an instance attribute
    _installed["s3"] = True
