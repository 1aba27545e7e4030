"""Per-shard completion records and the merge step that turns them into manifest.json.

Layout under the output root: ``shards/{name}.tar`` (training split), ``val/{name}.tar``
(validation split), ``parts/{name}.json`` (one record per finished shard, written after its
tar), ``parts/group-{g}.done.json`` (written after a group's last shard), ``parts/run.json``
(settings and held-out groups shared by all workers), ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from collections import Counter
from typing import Any

from at1_io import schema, storage

log = logging.getLogger(__name__)
RUN_FILE = "parts/run.json"


def shard_name(group: int, chunk: int) -> str:
    """Shard name (no dots) of chunk ``chunk`` of group ``group``."""
    return f"{group:05d}-{chunk:04d}"


SPLIT_DIRS = {schema.TRAIN: schema.SHARD_DIR, schema.VAL: schema.VAL_SHARD_DIR}


def shard_path(name: str, split: str = schema.TRAIN) -> str:
    """Shard tar path relative to the output root: ``shards/`` or, for validation, ``val/``."""
    return f"{SPLIT_DIRS[split]}/{name}.tar"


def record_path(name: str) -> str:
    """Shard record path relative to the output root."""
    return f"parts/{name}.json"


def group_done_path(group: int) -> str:
    """Group completion record path relative to the output root."""
    return f"parts/group-{group:05d}.done.json"


@dataclasses.dataclass
class ShardRecord:
    """What one finished shard contributes to the manifest (path None when it has 0 samples)."""

    name: str
    path: str | None
    num_samples: int
    sha256: str
    size_bytes: int
    skipped: dict[str, int]
    repaired: dict[str, int]
    licenses: dict[str, int]
    license_rejected: dict[str, int]
    caption_origins: dict[str, int]
    fingerprint: str = ""  # of the input group it was encoded from (input_items.digest)
    source: str = ""  # the input it was encoded from (sources' origin); "" in older records


class RecordError(RuntimeError):
    """An output folder without run.json, or with a record that cannot be parsed."""


def read_json(url: str) -> Any:
    """Parse a JSON file."""
    return json.loads(storage.read_bytes(url))


def read_run(root: str) -> dict[str, Any]:
    """The run's settings record; RecordError naming the file if it is missing or unreadable."""
    url = storage.join(root, RUN_FILE)
    try:
        run = read_json(url)
    except FileNotFoundError as e:
        raise RecordError(
            f"{root} is not an encode output (no {RUN_FILE}): run "
            f"`python -m data_prep.encode INPUT {root}` first"
        ) from e
    except ValueError as e:
        raise RecordError(
            f"{url} is unreadable ({e}); it records the run's settings: restore it, or encode "
            "into a new output folder"
        ) from e
    if not isinstance(run, dict) or not {"settings", "num_groups", "arrays"} <= set(run):
        raise RecordError(f"{url} is not a run record (settings, num_groups, arrays missing)")
    return run


def put_json(obj: Any, url: str, tmp_dir: str) -> None:
    """Write JSON complete-or-absent."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    storage.put_bytes(data, url, tmp_dir)


def read_record(url: str) -> dict | None:
    """A record written by this module, or None if it is absent or unreadable (redo its work)."""
    try:
        rec = read_json(url)
    except FileNotFoundError:
        return None
    except ValueError as e:  # cut or overwritten by hand: the work it records is redone
        log.warning("ignoring unreadable record %s (%s): its work is done again", url, e)
        return None
    return rec if isinstance(rec, dict) else None


def shard_done(root: str, name: str) -> bool:
    """True if the shard's record exists (its tar was published before the record)."""
    return storage.exists(storage.join(root, record_path(name)))


def read_group_records(root: str, groups: list[int]) -> dict[int, dict]:
    """Completion records ({group, chunks, fingerprint}) of the finished groups among these."""
    listed = {posixpath.basename(u) for u in storage.list_files(storage.join(root, "parts"))}
    found = [g for g in groups if posixpath.basename(group_done_path(g)) in listed]
    urls = [storage.join(root, group_done_path(g)) for g in found]
    out = {}
    for g, url, data in zip(found, urls, storage.read_many(urls), strict=True):
        try:
            rec = json.loads(data)
            out[g] = {
                "group": g,
                "chunks": int(rec["chunks"]),
                "fingerprint": rec.get("fingerprint"),
            }
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable record %s (%s): its group is done again", url, e)
            continue
        gone = [
            shard_name(g, c)
            for c in range(out[g]["chunks"])
            if posixpath.basename(record_path(shard_name(g, c))) not in listed
        ]
        if gone:
            log.warning("group %d lacks the records of shards %s: it is done again", g, gone)
            del out[g]
    return out


def remove_stale_chunks(root: str, group: int, chunks: int, split: str = schema.TRAIN) -> list[str]:
    """Delete tars and records of chunks >= ``chunks`` of a group (left by an earlier input)."""
    stale = []
    for folder, ext in ((SPLIT_DIRS[split], ".tar"), ("parts", ".json")):
        for url in storage.list_files(storage.join(root, folder), f"{group:05d}-*{ext}"):
            name = posixpath.basename(url).removesuffix(ext)
            if int(name.split("-")[1]) >= chunks:
                storage.remove(url)
                stale.append(url)
    return stale


class IncompleteError(RuntimeError):
    """Merge found groups that no worker has finished yet."""


class EmptyDatasetError(RuntimeError):
    """Every input item was skipped: no manifest is written for a data set without samples."""


# Skip reasons that count input tars, not items.
TAR_REASONS = frozenset({"truncated_input_tar", "corrupt_input_tar", "empty_input_tar"})


def skip_summary(skipped: dict[str, int], kept: int) -> str:
    """``N of M input items skipped (reason n, ...)``, the most frequent reason first."""
    items = sum(n for r, n in skipped.items() if r not in TAR_REASONS)
    tars = sum(n for r, n in skipped.items() if r in TAR_REASONS)
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items(), key=lambda x: (-x[1], x[0])))
    bad_tars = f", {tars} input tars empty, corrupt or cut short" if tars else ""
    return f"{items} of {items + kept} input items skipped{bad_tars} ({reasons or 'no reason'})"


def skip_advice(skipped: dict[str, int], settings: dict[str, Any]) -> str:
    """The flags that would keep the skipped items, for the reasons that have one."""
    tips = []
    rejected = sum(n for r, n in skipped.items() if r.startswith("license_"))
    if rejected:
        tips.append(
            f"the license filter (--licenses {settings.get('licenses')}) rejected {rejected}: "
            "pass --licenses any if you may use these images whatever their license "
            "metadata says, or add the ids you may use to --licenses"
        )
    if skipped.get("missing_caption"):
        tips.append(
            f"{skipped['missing_caption']} had no caption: --caption missing generates them"
        )
    if skipped.get("too_small"):
        tips.append(f"{skipped['too_small']} were smaller than --min-size: lower it")
    if any(r in TAR_REASONS for r in skipped):
        tips.append("the log names each damaged tar: download it again")
    return "; ".join(tips) or "see docs/data_prep.md (Bad input) for each reason"


def skip_warning(manifest: schema.Manifest) -> str | None:
    """A warning line when a run skipped more input items than it kept, else None."""
    items = sum(n for r, n in manifest.skipped.items() if r not in TAR_REASONS)
    kept = manifest.num_samples + manifest.val_num_samples
    if items <= kept:
        return None
    summary = skip_summary(manifest.skipped, kept)
    return f"warning: {summary}; {skip_advice(manifest.skipped, manifest.settings)}"


COUNTS = ("skipped", "repaired", "licenses", "license_rejected", "caption_origins")
SPLIT_COUNTS = ("licenses", "sources", "caption_origins", "skipped")


def _read_records(root: str, run: dict) -> list[ShardRecord]:
    """Every shard record of a finished run, in group and chunk order."""
    groups = range(run["num_groups"])
    done = read_group_records(root, list(groups))
    missing = [g for g in groups if g not in done]
    if missing:
        raise IncompleteError(
            f"{len(missing)} of {len(groups)} input groups not finished (first: {missing[:5]})"
        )
    names = [shard_name(g, c) for g in groups for c in range(done[g]["chunks"])]
    urls = [storage.join(root, record_path(name)) for name in names]
    out = []
    for name, url, data in zip(names, urls, storage.read_many(urls), strict=True):
        try:
            rec = ShardRecord(**json.loads(data))
        except (ValueError, TypeError) as e:
            raise RecordError(
                f"{url} is unreadable ({e}): delete it and rerun the encoder, which encodes "
                f"shard {name} again"
            ) from e
        group = int(name.split("-")[0])
        if rec.fingerprint != done[group]["fingerprint"]:
            raise IncompleteError(
                f"shard {name} was encoded from other input than group {group} now records "
                "(the input changed while workers ran): rerun the encoder to redo the group"
            )
        out.append(rec)
    return out


def _split_totals(recs: list[ShardRecord]) -> schema.SplitTotals:
    counts = {k: Counter() for k in SPLIT_COUNTS}
    for rec in recs:
        for k in ("licenses", "caption_origins", "skipped"):
            counts[k].update(getattr(rec, k))
        if rec.source and rec.num_samples:  # records of older runs name no source: unknown
            counts["sources"][rec.source] += rec.num_samples
    kept = [r for r in recs if r.num_samples > 0]
    return schema.SplitTotals(
        num_samples=sum(r.num_samples for r in kept),
        num_shards=len(kept),
        **{k: dict(sorted(c.items())) for k, c in counts.items()},
    )


def merge(root: str, tmp_dir: str) -> schema.Manifest:
    """manifest.json from all records; IncompleteError if unfinished, EmptyDatasetError if empty."""
    run = read_run(root)
    val_groups = set(run.get("val_groups") or [])  # absent in runs started before the split
    by_split: dict[str, list[ShardRecord]] = {schema.TRAIN: [], schema.VAL: []}
    for rec in _read_records(root, run):
        split = schema.VAL if int(rec.name.split("-")[0]) in val_groups else schema.TRAIN
        by_split[split].append(rec)
    totals = {split: _split_totals(recs) for split, recs in by_split.items()}
    checks = [(schema.TRAIN, "no training sample kept" if val_groups else "no sample kept")]
    checks += [(schema.VAL, "no validation sample kept")] if val_groups else []
    for split, what in checks:
        if not totals[split].num_samples:
            skipped = totals[split].skipped
            raise EmptyDatasetError(
                f"{what}: {skip_summary(skipped, 0)}; {skip_advice(skipped, run['settings'])}. "
                f"The settings of {root} are fixed: rerun into a new output folder"
            )
    all_recs = by_split[schema.TRAIN] + by_split[schema.VAL]
    overall = {k: Counter() for k in COUNTS}
    for rec in all_recs:
        for k, c in overall.items():
            c.update(getattr(rec, k))
    sources = Counter()
    for t in totals.values():
        sources.update(t.sources)

    def shard_infos(recs: list[ShardRecord]) -> list[schema.ShardInfo]:
        return [
            schema.ShardInfo(r.name, r.path, r.num_samples, r.sha256, r.size_bytes, r.source)
            for r in recs
            if r.num_samples > 0
        ]

    manifest = schema.Manifest(
        schema_version=schema.SCHEMA_VERSION,
        arrays={
            k: schema.ArraySpec(k, tuple(v["shape"]), v["dtype"], v.get("description", ""))
            for k, v in run["arrays"].items()
        },
        shards=shard_infos(by_split[schema.TRAIN]),
        autoencoder=run["autoencoder"],
        text_encoders=run["text_encoders"],
        captioning=run["captioning"],
        settings=run["settings"],
        val_prompts=run.get("val_prompts"),
        val_shards=shard_infos(by_split[schema.VAL]),
        sources=dict(sorted(sources.items())),
        splits={k: t for k, t in totals.items() if k == schema.TRAIN or val_groups},
        **{k: dict(sorted(c.items())) for k, c in overall.items()},
    )
    text = schema.dump_manifest(manifest)
    schema.load_manifest(text)  # never publish a manifest our own reader rejects
    storage.put_bytes(text.encode(), storage.join(root, schema.MANIFEST_NAME), tmp_dir)
    return manifest
