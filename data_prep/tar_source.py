"""img2dataset / webdataset tar input: whole samples of each tar, a damaged tar ends in a skip."""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator

from at1_io import storage
from data_prep.input_items import (
    RawSample,
    ReadFailure,
    SourceError,
    caption_from_meta,
    decode_caption,
    digest,
    parse_meta,
)


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
        meta = parse_meta(fields["json"], repairs) if "json" in fields else {}
        caption = decode_caption(fields.get("txt"), repairs)
        if caption is None:
            caption = caption_from_meta(meta, repairs)
        image = next((fields[e] for e in ("jpg", "jpeg", "png", "webp") if e in fields), None)
        skip = None if image is not None else "missing_image_file"
        return RawSample(f"{tar_name}/{key}", image, None, caption, meta, repairs, skip)
