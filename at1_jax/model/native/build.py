"""Compiles the package's C++ FFI kernels with the machine's C++ compiler and caches the library.

The library is keyed by its source, the compiler command and the jaxlib whose FFI headers it
was built against, so an upgrade rebuilds it; it is written to a temporary name and renamed,
so processes that build at the same time never load a half-written file.
`python -m at1_jax.model.native.build` builds it ahead of time (`make setup` does)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("depthwise_gelu.cc")
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden")
BUILD_TIMEOUT_S = 300


class NativeBuildError(RuntimeError):
    """The kernel library could not be compiled or loaded here."""


def cache_dir() -> Path:
    """Where built libraries live: $AT1_NATIVE_CACHE, else $XDG_CACHE_HOME or ~/.cache/at1_jax."""
    if os.environ.get("AT1_NATIVE_CACHE"):
        return Path(os.environ["AT1_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "at1_jax" / "native"


def compiler() -> list[str]:
    """The C++ compiler command: $CXX, else the first of c++, g++, clang++ on PATH."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [name]
    raise NativeBuildError("no C++ compiler (set CXX, or install g++)")


def _command(out: Path) -> list[str]:
    import jax

    return [*compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]


def library_path() -> Path:
    """The cached library's path for this source, compiler, flags and jaxlib."""
    import jaxlib

    key = hashlib.sha256(SOURCE.read_bytes())
    for part in (*compiler(), *FLAGS, jaxlib.__version__, platform.machine()):
        key.update(part.encode() + b"\0")
    return cache_dir() / f"depthwise_gelu-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """The library's path, compiling it first if it is not cached; NativeBuildError if it fails."""
    path = library_path()
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    except OSError as e:
        msg = f"cannot write to {path.parent}: {e} (set AT1_NATIVE_CACHE)"
        raise NativeBuildError(msg) from None
    os.close(fd)
    try:
        cmd = _command(Path(tmp))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NativeBuildError(f"{shlex.join(cmd)}: {e}") from None
        if done.returncode:
            tail = done.stderr.strip().splitlines()[-5:]
            raise NativeBuildError(f"{shlex.join(cmd)} failed: " + " | ".join(tail))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built %s", path)
    return path


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded kernel library (built on first use); NativeBuildError if it cannot be had."""
    path = build()
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeBuildError(f"{path}: {e} (delete it to rebuild)") from None


def main(argv: list[str] | None = None) -> int:
    """Builds the library now and prints its path; exit 1 with the reason if it cannot."""
    del argv
    try:
        print(library()._name)
    except NativeBuildError as e:
        print(f"at1_jax native kernels not built: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
