"""CLI: ``python -m data_prep.encode INPUT OUTPUT [options]`` and ``... encode merge OUTPUT``."""

from __future__ import annotations

import argparse
import logging
import sys

from at1_io import storage
from at1_io.help_format import DefaultsHelpFormatter
from data_prep import records
from data_prep.settings import EncodeSettings
from data_prep.workdir import work_dir

EPILOG = """examples:
  python -m data_prep.encode ./images ./dataset --vae pixel \
      --text-encoder clip=openai/clip-vit-large-patch14
  python -m data_prep.encode s3://raw/laion-tars s3://out/ds --caption all \
      --num-workers 8 --worker-index 3
  python -m data_prep.encode ./images ./dataset --val-fraction 0.02
  python -m data_prep.encode merge s3://out/ds
  python -m data_prep.encode ./images ./dataset --benchmark
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser mirroring EncodeSettings."""
    d = EncodeSettings("", "")
    p = argparse.ArgumentParser(
        prog="python -m data_prep.encode",
        description="Filter, caption and encode images into webdataset latent shards.",
        epilog=EPILOG,
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("input", help="image folder, tar(s), .parquet/.jsonl table, or tfds:NAME")
    p.add_argument("output", help="dataset root (local path or s3://bucket/prefix)")
    a = p.add_argument_group("input")
    a.add_argument(
        "--input-format", default="auto", choices=["auto", "folder", "tars", "table", "tfds"]
    )
    a.add_argument("--image-column", default=None, help="table/tfds column with the image")
    a.add_argument("--caption-column", default=d.caption_column)
    a.add_argument("--split", default=d.split, help="tfds split")
    a.add_argument("--tfds-data-dir", default=None)
    a.add_argument("--licenses", default=d.licenses, help="allowed canonical ids, or 'any'")
    a.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="hold out this share of the input's groups (whole shards) as the validation split",
    )
    a.add_argument(
        "--val-input",
        default=None,
        help="encode this input (same kind and options as INPUT) as the validation split",
    )
    a.add_argument(
        "--min-size",
        type=int,
        default=None,
        help="skip images whose short side is smaller (default: resolution/2)",
    )
    a.add_argument("--max-pixels", type=int, default=d.max_pixels, help="decompression-bomb limit")
    e = p.add_argument_group("encoding")
    e.add_argument("--resolution", type=int, default=d.resolution)
    e.add_argument("--vae", default=d.vae, help="diffusers AutoencoderKL id/path, or 'pixel'")
    e.add_argument("--vae-subfolder", default=None)
    e.add_argument("--latent", default=d.latent, choices=["mean_std", "sample"])
    e.add_argument(
        "--text-encoder",
        dest="text_encoders",
        action="append",
        default=None,
        help="[name:]kind=model with kind clip|t5|sentence; repeatable "
        f"(default {d.text_encoders[0]})",
    )
    e.add_argument("--clip-tokens", action="store_true", help="also store CLIP per-token states")
    e.add_argument("--text-max-length", type=int, default=None)
    e.add_argument("--val-prompts", default=None, help="file with one prompt per line")
    c = p.add_argument_group("captioning")
    c.add_argument("--caption", default=d.caption, choices=["off", "all", "missing", "both"])
    c.add_argument("--captioner", default=d.captioner)
    c.add_argument("--caption-prompt", default=d.caption_prompt)
    c.add_argument("--caption-temperature", type=float, default=d.caption_temperature)
    c.add_argument("--caption-max-new-tokens", type=int, default=d.caption_max_new_tokens)
    c.add_argument("--caption-batch-size", type=int, default=d.caption_batch_size)
    r = p.add_argument_group("run")
    r.add_argument("--shard-size", type=int, default=d.shard_size)
    r.add_argument("--batch-size", type=int, default=d.batch_size)
    r.add_argument("--device", default=d.device)
    r.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16", "fp16"])
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--num-workers", type=int, default=None, help="default: WORLD_SIZE / SLURM")
    r.add_argument("--worker-index", type=int, default=None, help="default: RANK / SLURM")
    r.add_argument("--decode-threads", type=int, default=d.decode_threads)
    r.add_argument("--no-progress", dest="progress", action="store_false")
    r.add_argument(
        "--benchmark",
        action="store_true",
        help="time the pipeline and the bare encoders on INPUT (OUTPUT is scratch)",
    )
    r.add_argument("--benchmark-images", type=int, default=64)
    return p


def settings_from_args(ns: argparse.Namespace) -> EncodeSettings:
    """EncodeSettings from parsed arguments."""
    fields = {f for f in EncodeSettings.__dataclass_fields__}
    kwargs = {k: v for k, v in vars(ns).items() if k in fields}
    if kwargs.get("text_encoders") is None:
        kwargs.pop("text_encoders", None)
    return EncodeSettings(**kwargs)


def _val_note(m) -> str:
    if not m.val_shards:
        return ""
    return f", validation split {m.val_num_samples} samples in {len(m.val_shards)} shards"


def _warn_skips(m) -> None:
    warning = records.skip_warning(m)
    if warning:
        sys.stdout.flush()  # the warning must be the last thing a terminal shows
        print(warning, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv[:1] == ["merge"]:
        mp = argparse.ArgumentParser(
            formatter_class=DefaultsHelpFormatter, prog="python -m data_prep.encode merge"
        )
        mp.add_argument("output")
        out = mp.parse_args(argv[1:]).output
        with work_dir() as tmp:
            try:
                if storage.is_s3(out):
                    storage.check_s3_reachable(out)
                m = records.merge(out, tmp)
            except records.IncompleteError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            except (records.RecordError, records.EmptyDatasetError, storage.StorageError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        print(f"manifest: {len(m.shards)} shards, {m.num_samples} samples{_val_note(m)}")
        _warn_skips(m)
        return 0
    ns = build_parser().parse_args(argv)
    s = settings_from_args(ns)
    try:
        s.validate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from data_prep import pipeline  # torch loads here, after argument errors are reported

    try:
        if ns.benchmark:
            from data_prep import bench

            bench.print_report(bench.run(s, ns.benchmark_images))
            return 0
        result = pipeline.run(s)
    except (ValueError, OSError, RuntimeError) as err:
        # Bad settings, missing input, unreachable S3, a run that kept nothing: one clear line.
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = result.manifest
    print(
        f"wrote {len(result.written)} shards, {len(result.resumed)} already complete; "
        f"{result.images} items in {result.seconds:.1f} s "
        f"({result.images / max(result.seconds, 1e-9):.2f} images/s)"
        + (f"; manifest: {m.num_samples} samples in {len(m.shards)} shards" if m else "")
        + (_val_note(m) if m else "")
    )
    if m:
        _warn_skips(m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
