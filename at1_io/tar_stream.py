"""Read a tar's files as a stream, refusing one that is truncated or lacks its end block."""

from __future__ import annotations

import collections
import io
import tarfile
from collections.abc import Iterator
from typing import IO


class _CountingReader(io.RawIOBase):
    """Read-only stream wrapper that counts the bytes read and keeps the last few chunks.

    tarfile hides truncation, and in stream mode takes a garbage header for the end of the
    archive: the count and the recent bytes let the reader check the end block itself.
    """

    def __init__(self, f: IO[bytes]):
        self.f, self.count = f, 0
        self.recent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=4)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        self.recent.append((self.count, bytes(data)))
        self.count += len(data)
        return len(data)

    def block_at(self, offset: int) -> bytes | None:
        """The tar block at `offset` if it is among the recently read bytes."""
        if not self.recent:
            return None
        start = self.recent[0][0]
        data = b"".join(chunk for _, chunk in self.recent)
        if not start <= offset <= start + len(data) - tarfile.BLOCKSIZE:
            return None
        return data[offset - start : offset - start + tarfile.BLOCKSIZE]


def iter_tar_files(fileobj: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, bytes) of regular files in a tar read as a stream.

    Raises tarfile.ReadError for a truncated tar, which tarfile alone reports as a normal
    end when the cut falls inside or at a header: a complete tar ends with a zero block.
    """
    counter = _CountingReader(fileobj)
    stream = io.BufferedReader(counter, buffer_size=1 << 20)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                yield member.name, f.read() if f is not None else b""
        end = tar.offset
        block = counter.block_at(end)
        while stream.read(1 << 20):
            pass
    if counter.count < end + tarfile.BLOCKSIZE:
        raise tarfile.ReadError(
            f"truncated tar: ends at byte {counter.count}, before its end block"
        )
    if block is not None and any(block):
        raise tarfile.ReadError(f"corrupt tar: an invalid header at byte {end}, not its end block")
