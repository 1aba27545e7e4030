"""The held-out validation split: which input groups it takes, and one group space for both.

``--val-fraction F`` holds out whole groups of the input (``--shard-size`` items of a
folder/table/tfds input, or one input tar), so no image is cut between the splits.
``--val-input DIR`` encodes a second input as the validation split: its groups follow the
input's, so every group of a run has one number, one fingerprint and one worker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from at1_io.schema import TRAIN, VAL
from data_prep.input_items import RawSample, ReadFailure


def held_out_groups(num_groups: int, fraction: float, seed: int) -> list[int]:
    """Groups held out by ``--val-fraction``: round(fraction × num_groups), at least one.

    Chosen by a hash of (seed, group index), not by position, so the split does not take one
    end of a sorted listing; the same input listing and seed always give the same groups, and
    a larger fraction holds out a superset. ValueError when no training group would be left.
    """
    if fraction <= 0:
        return []
    n = max(1, int(fraction * num_groups + 0.5))
    if n >= num_groups:
        raise ValueError(
            f"--val-fraction {fraction} holds out {n} of the input's {num_groups} groups, "
            "leaving none to train on: lower it, or lower --shard-size so the input makes more "
            "groups (a tar input makes one group per tar)"
        )

    def rank(g: int) -> str:
        return hashlib.sha256(f"{seed}:{g}".encode()).hexdigest()

    return sorted(sorted(range(num_groups), key=rank)[:n])


class SplitSource:
    """The input's groups 0..N-1, then the validation input's N..N+M-1, and each one's split."""

    def __init__(self, train, val=None, val_groups: list[int] | None = None):
        self.train, self.val = train, val
        self.kind = train.kind
        self.num_train_groups = train.num_groups()
        total = self.num_train_groups + (val.num_groups() if val is not None else 0)
        if val is not None:
            val_groups = list(range(self.num_train_groups, total))
        self.val_groups = sorted(val_groups or [])
        self._val = set(self.val_groups)
        self._total = total

    def num_groups(self) -> int:
        """Groups of both inputs."""
        return self._total

    def _locate(self, g: int):
        if g < self.num_train_groups:
            return self.train, g
        return self.val, g - self.num_train_groups

    def split_of(self, g: int) -> str:
        """``val`` for a held-out group, else ``train``."""
        return VAL if g in self._val else TRAIN

    def group_size(self, g: int) -> int | None:
        """Items in group g (None if unknown before reading)."""
        src, i = self._locate(g)
        return src.group_size(i)

    def fingerprint(self, g: int) -> str:
        """Digest of group g's item list."""
        src, i = self._locate(g)
        return src.fingerprint(i)

    def origin(self, g: int) -> str:
        """The input group g comes from."""
        src, i = self._locate(g)
        return src.origin(i)

    def iter_group(self, g: int) -> Iterator[RawSample | ReadFailure]:
        """Items of group g in order."""
        src, i = self._locate(g)
        return src.iter_group(i)
