"""An encode run: checks before work, resumable per-shard processing, manifest at the end."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from at1_io import schema, storage
from at1_io.constants import PIXEL
from data_prep import model_refs, records, sources, splits, val_prompts, workers
from data_prep.models import Models
from data_prep.settings import ADDED_DEFAULTS, EncodeSettings, parse_spec
from data_prep.shard_job import ChunkCounts, ChunkEncoder
from data_prep.workdir import remove_output_temps, work_dir

log = logging.getLogger(__name__)


class SettingsMismatch(RuntimeError):
    """The output folder was started with different content settings."""


@dataclasses.dataclass
class RunResult:
    """What a run did: shards written and skipped (already complete), the manifest if merged."""

    written: list[str]
    resumed: list[str]
    images: int
    seconds: float
    manifest: schema.Manifest | None


def _open(s: EncodeSettings, url: str):
    return sources.open_source(
        url,
        s.input_format,
        s.shard_size,
        s.image_column,
        s.caption_column,
        s.split,
        s.tfds_data_dir,
    )


def open_split_source(s: EncodeSettings) -> splits.SplitSource:
    """The input and the validation input as one group space, with the held-out groups.

    An output that recorded its split keeps it: a resumed run holds out the same groups.
    """
    train = _open(s, s.input)
    if s.val_input:
        try:
            val = _open(s, s.val_input)
        except sources.SourceError as e:
            raise sources.SourceError(f"--val-input: {e}") from e
        return splits.SplitSource(train, val)
    run_url = storage.join(s.output, records.RUN_FILE)
    recorded = records.read_run(s.output).get("val_groups") if storage.exists(run_url) else None
    if recorded is None:
        recorded = splits.held_out_groups(train.num_groups(), s.val_fraction, s.seed)
    return splits.SplitSource(train, val_groups=recorded)


def preflight(s: EncodeSettings) -> splits.SplitSource:
    """Every check that can fail before work starts: settings, endpoints, input, prompts."""
    s.validate()
    for url in (s.input, s.val_input or "", s.output, s.val_prompts or ""):
        if storage.is_s3(url):
            storage.check_s3_reachable(url)
    check_val_input(s.input, s.val_input)
    source = open_split_source(s)
    val_prompts.load_prompts(s.val_prompts)
    for url in (s.input, s.val_input):
        if url:
            check_output(s.output, url)
    check_run(s, source)
    check_model_refs(s)
    return source


class OutputError(ValueError):
    """An output location that cannot hold a data set; raised before any work starts."""


def check_output(output: str, input_url: str) -> None:
    """A local output must be creatable and writable, and apart from a folder input."""
    if storage.is_s3(output):
        return  # reachability and the bucket were checked already
    out = os.path.realpath(output)
    probe = out
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise OutputError(f"output {output}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"output {output}: {probe} is not writable")
    inp = os.path.realpath(input_url)
    if not storage.is_s3(input_url) and os.path.isdir(inp):
        if out == inp:
            raise OutputError(
                f"output {output} is the input folder {input_url}: choose another folder"
            )
        if out.startswith(inp + os.sep):
            raise OutputError(
                f"output {output} is inside the input folder {input_url}: a rerun would read "
                "its shards as input; choose a folder outside it"
            )


def check_val_input(input_url: str, val_input: str | None) -> None:
    """The validation input must not be, hold or lie inside the input: no image in both."""
    if not val_input:
        return

    def norm(url: str) -> str:
        return url.rstrip("/") if storage.is_s3(url) else os.path.realpath(url)

    a, b = norm(input_url), norm(val_input)
    if a == b or b.startswith(a + "/") or a.startswith(b + "/"):
        raise ValueError(
            f"--val-input {val_input} overlaps the input {input_url} (one holds the other): its "
            "images would be trained on too; give an input apart from it, or hold out part of "
            "the input with --val-fraction"
        )


def check_model_refs(s: EncodeSettings) -> None:
    """Every model flag names an existing local model folder or a usable hub id."""
    if s.vae != PIXEL:
        model_refs.check_ref(f"--vae {s.vae}", s.vae, s.vae_subfolder, known=(PIXEL,))
    for value in s.text_encoders:
        model_refs.check_ref(f"--text-encoder {value}", parse_spec(value).model)
    if s.caption != "off":
        model_refs.check_ref(f"--captioner {s.captioner}", s.captioner)


def check_run(s: EncodeSettings, source: splits.SplitSource) -> None:
    """Refuse to continue an output started with other content settings or input groups."""
    if not check_settings(s.output, s.content_settings()):
        return
    before = records.read_run(s.output)["num_groups"]
    now = source.num_groups()
    if now != before:
        unit = "input tars" if source.kind == "tars" else f"groups of --shard-size {s.shard_size}"
        if source.val is not None:
            unit += f" ({source.num_train_groups} of the input, the rest of --val-input)"
        raise SettingsMismatch(
            f"the input of {s.output} changed since its run started: {now} {unit} now, "
            f"{before} when it started (items added or removed). Restore the input, or encode "
            "it into a new output folder"
        )


def _run_info(s: EncodeSettings, models: Models, source: splits.SplitSource) -> dict:
    arrays = {
        k: {**dataclasses.asdict(v), "shape": list(v.shape)} for k, v in models.arrays.items()
    }
    return {
        "settings": s.content_settings(),
        "arrays": arrays,
        "num_groups": source.num_groups(),
        "val_groups": source.val_groups,
        "val_prompts": {"path": schema.VAL_PROMPTS_PATH},
        **models.info(),
    }


def check_settings(root: str, settings: dict) -> bool:
    """False for a fresh output; SettingsMismatch if it was started with other settings."""
    if not storage.exists(storage.join(root, records.RUN_FILE)):
        return False
    old = {**ADDED_DEFAULTS, **records.read_run(root)["settings"]}
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise SettingsMismatch(
            f"{root} was started with different settings ({', '.join(diff)}); "
            "use a new output folder or the same settings"
        )
    return True


def _check_or_write_run(root: str, info: dict, tmp: str) -> None:
    url = storage.join(root, records.RUN_FILE)
    if check_settings(root, info["settings"]):
        old = records.read_run(root)
        if old["arrays"] != info["arrays"]:
            raise SettingsMismatch(
                f"{root} was started with models that write other arrays "
                f"({old['arrays']} then, {info['arrays']} now); use a new output folder"
            )
        return
    records.put_json(info, url, tmp)


def _write_val_prompts(root: str, s: EncodeSettings, models: Models, tmp: str) -> None:
    url = storage.join(root, schema.VAL_PROMPTS_PATH)
    if storage.exists(url):
        return
    prompts = val_prompts.load_prompts(s.val_prompts)
    samples = []
    for start in range(0, len(prompts), s.batch_size):
        texts = prompts[start : start + s.batch_size]
        arrays = models.encode_text(texts)
        for i, text in enumerate(texts):
            key = f"val{start + i:04d}"
            samples.append(
                {
                    "__key__": key,
                    **{k: v[i] for k, v in arrays.items()},
                    "caption": text,
                    "json": {"index": start + i},
                }
            )
    path = os.path.join(tmp, "val_prompts.tar")
    with open(path, "wb") as f:
        schema.write_shard(f, samples)
    storage.put_file(path, url)


def _publish_shard(
    root: str,
    name: str,
    samples: list[dict],
    counts: ChunkCounts,
    group: tuple[str, str, str],
    tmp: str,
) -> None:
    """Publish a shard's tar, then its record; ``group`` is (fingerprint, split, origin)."""
    fingerprint, split, origin = group
    path, sha, size = None, "", 0
    if samples:
        local = os.path.join(tmp, f"{name}.tar")
        with open(local, "wb") as f:
            schema.write_shard(f, samples)
        with open(local, "rb") as f:
            data = f.read()
        sha, size, path = schema.sha256_bytes(data), len(data), records.shard_path(name, split)
        storage.put_file(local, storage.join(root, path))  # the tar first, then its record
        os.remove(local)
    else:  # a changed input may have left a tar of this name that no record will name
        storage.remove(storage.join(root, records.shard_path(name, split)))
    rec = records.ShardRecord(
        name,
        path,
        len(samples),
        sha,
        size,
        **{
            k: dict(getattr(counts, k))
            for k in ("skipped", "repaired", "licenses", "license_rejected", "caption_origins")
        },
        fingerprint=fingerprint,
        source=origin,
    )
    records.put_json(dataclasses.asdict(rec), storage.join(root, records.record_path(name)), tmp)


def _forget_changed_groups(root: str, groups: list[int]) -> None:
    """Drop the completion records of groups whose input changed, so no merge uses them."""
    if not groups:
        return
    if len(groups) == 1:
        what = f"input group {groups[0]} changed since it was encoded: encoding it again"
    else:
        listed = ", ".join(map(str, groups))
        what = f"input groups {listed} changed since they were encoded: encoding them again"
    log.warning("%s (files added, removed or resized)", what)
    for g in groups:
        storage.remove(storage.join(root, records.group_done_path(g)))


def run(s: EncodeSettings) -> RunResult:
    """Encode this worker's share of the input; merge the manifest if every group is done."""
    source = preflight(s)
    num_workers, worker_index = workers.resolve_worker(s.num_workers, s.worker_index)
    mine = workers.my_groups(source.num_groups(), num_workers, worker_index)
    fingerprints = {g: source.fingerprint(g) for g in mine}
    done = records.read_group_records(s.output, mine)
    todo = [g for g in mine if g not in done or done[g]["fingerprint"] != fingerprints[g]]
    _forget_changed_groups(s.output, [g for g in todo if g in done])
    resumed = [
        records.shard_name(g, c) for g in mine if g not in todo for c in range(done[g]["chunks"])
    ]
    log.info(
        "worker %d/%d: %d groups, %d already done",
        worker_index,
        num_workers,
        len(mine),
        len(mine) - len(todo),
    )
    if not storage.is_s3(s.output):
        for path in remove_output_temps(s.output, mine):
            log.info("removed %s, left by a run that was killed", path)
    models = Models(s)
    written, n_images = [], 0
    with work_dir() as tmp, ThreadPoolExecutor(s.decode_threads) as pool:
        _check_or_write_run(s.output, _run_info(s, models, source), tmp)
        if worker_index == 0:
            _write_val_prompts(s.output, s, models, tmp)
        encoder = ChunkEncoder(s, models, pool)
        sizes = [source.group_size(g) for g in todo]
        total = None if None in sizes else sum(sizes)
        bar = tqdm(total=total, unit="img", disable=not s.progress, smoothing=0.1)
        start = time.perf_counter()  # the shard loop only: what --benchmark compares
        for g in todo:
            chunk, items, fp = 0, [], fingerprints[g]
            split = source.split_of(g)
            group = (fp, split, source.origin(g))

            def flush(chunk: int, items: list, g: int = g, group: tuple = group) -> None:
                nonlocal n_images
                name = records.shard_name(g, chunk)
                rec = records.read_record(storage.join(s.output, records.record_path(name)))
                if rec is not None and rec.get("fingerprint") == group[0]:
                    resumed.append(name)
                    return
                samples, counts = encoder.encode(items, g, chunk, name.replace("-", "_"))
                _publish_shard(s.output, name, samples, counts, group, tmp)
                written.append(name)
                n_images += len(items)

            for item in source.iter_group(g):
                items.append(item)
                bar.update(1)
                if len(items) == s.shard_size:
                    flush(chunk, items)
                    chunk, items = chunk + 1, []
            if items or chunk == 0:
                flush(chunk, items)
                chunk += 1
            for url in records.remove_stale_chunks(s.output, g, chunk, split):
                log.info("removed %s: the changed input has fewer chunks in group %d", url, g)
            done_rec = {"group": g, "chunks": chunk, "fingerprint": fp}
            records.put_json(done_rec, storage.join(s.output, records.group_done_path(g)), tmp)
        bar.close()
        seconds = time.perf_counter() - start
        manifest = None
        try:
            manifest = records.merge(s.output, tmp)
        except records.IncompleteError as e:
            log.info("manifest not written yet: %s; run `python -m data_prep.encode merge`", e)
    rate = n_images / seconds if seconds > 0 else 0.0
    log.info("encoded %d input items in %.1f s (%.2f images/s)", n_images, seconds, rate)
    return RunResult(written, resumed, n_images, seconds, manifest)
