"""Private scratch folders that a killed run does not leave behind, and output temp files.

A work folder holds a lock file, flock-ed for as long as its process lives (the kernel drops
the lock when the process dies, kill -9 included). Each new work folder first removes every
``data_prep-*`` folder whose lock can be taken: their runs are gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator

from at1_io import schema, storage

log = logging.getLogger(__name__)
PREFIX = "data_prep-"
LOCK = ".lock"
GROUP_RE = re.compile(r"^(?:(?P<g>\d{5})-\d{4}\.(?:tar|json)|group-(?P<d>\d{5})\.done\.json)$")
# A shared file (run.json, manifest.json, val_prompts.tar) is written in well under a second:
# a temp copy of one this old is left by a killed run, not one in flight.
SHARED_TEMP_AGE_S = 600


def remove_stale_work_dirs(base: str) -> list[str]:
    """Delete the ``data_prep-*`` folders under ``base`` whose process has died."""
    removed = []
    for entry in os.scandir(base):
        if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(os.path.join(entry.path, LOCK), os.O_RDWR)
        except FileNotFoundError:
            continue  # not made by work_dir
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its process is alive
        finally:
            os.close(fd)
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


@contextlib.contextmanager
def work_dir() -> Iterator[str]:
    """A scratch folder in the system temp dir, locked while this process lives."""
    base = tempfile.gettempdir()
    for path in remove_stale_work_dirs(base):
        log.info("removed %s, left by a run that was killed", path)
    # Locked before it gets its visible name, so no cleanup can take it for a dead run's.
    path = tempfile.mkdtemp(prefix=".init-" + PREFIX, dir=base)
    fd = os.open(os.path.join(path, LOCK), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        final = os.path.join(base, os.path.basename(path).removeprefix(".init-"))
        os.rename(path, final)
        path = final
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def remove_output_temps(root: str, groups: list[int]) -> list[str]:
    """Delete temp files a killed run left in a local output (its groups', old shared ones)."""
    # Other workers' groups are left to them: their temp files may be in flight.
    mine, removed = set(groups), []
    now = time.time()
    for sub in ("", "parts", schema.SHARD_DIR, schema.VAL_SHARD_DIR):
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            m = storage.TEMP_RE.match(entry.name)
            if not m or not entry.is_file(follow_symlinks=False):
                continue
            g = GROUP_RE.match(m["target"])
            if g:
                stale = int(g["g"] or g["d"]) in mine
            else:
                stale = now - entry.stat().st_mtime > SHARED_TEMP_AGE_S
            if stale:
                os.remove(entry.path)
                removed.append(entry.path)
    return removed
