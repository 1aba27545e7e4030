"""The GPU benchmark suite: every figure the first GPU must give, in one command.

python -m at1_jax.bench.gpu_suite OUT [--cpu-smoke] [--budget-s 420]

Per preset (bf16 compute, fp32 parameters): images/s, MFU against the chip's dense bf16
peak, peak device memory and compile time of the real sharded train step, for the attention
(cuDNN vs XLA) and depthwise (grouped conv vs shifted adds) implementations, remat on/off and
the blocks as one lax.scan (xl-600m's compile time);
the largest `xl-600m` batch that fits; the sampler (DPM++ 2M, 20 steps, guidance 6) with the
SDXL-layout VAE decoder at 256 px; the shard reader's images/s from local shards against what
the step consumes. Cases run in priority order; one that fails (e.g. out of memory) is
recorded with its error and the suite goes on; cases past the time budget are recorded as
skipped. Writes OUT/report.json and OUT/report.md. `--cpu-smoke` runs every kind of case at
toy sizes (the tests run it).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import jax

from at1_io.help_format import DefaultsHelpFormatter
from at1_jax.bench.benchmarks import bench_sample, bench_train
from at1_jax.model.presets import get_preset

# (preset, global batch) at full size; the smoke run swaps in the tiny preset.
GPU_BATCH = {"tld-101m": 256, "at1": 256, "xl-600m": 128}
SMOKE_PRESET, SMOKE_BATCH = "tld-tiny", 4


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: `kind` is train, max_batch, sample or reader."""

    name: str
    kind: str
    params: dict[str, Any]


def cases(smoke: bool) -> list[Case]:
    """All cases, most important first (the MFU targets, then the rest)."""

    def train(preset, attention, depthwise, remat=False, scan=False):
        batch = SMOKE_BATCH if smoke else GPU_BATCH[preset]
        name = f"{preset} b{batch} attn={attention} dw={depthwise}" + (" remat" if remat else "")
        name += " scan" if scan else ""
        p = {"preset": SMOKE_PRESET if smoke else preset, "batch": batch, "attention": attention}
        return Case(name, "train", {**p, "depthwise": depthwise, "remat": remat, "scan": scan})

    preset = SMOKE_PRESET if smoke else "tld-101m"
    sample = Case("sampler dpm++ 20 steps g6 + SDXL VAE", "sample", {"preset": preset})
    reader = Case("shard reader vs tld-101m step", "reader", {"preset": preset})
    largest = Case(
        "xl-600m largest batch (remat)",
        "max_batch",
        {"preset": SMOKE_PRESET, "start": SMOKE_BATCH, "limit": 2 * SMOKE_BATCH}
        if smoke
        else {"preset": "xl-600m", "start": 128, "limit": 4096},
    )
    if smoke:  # one case of each kind; cuDNN attention fails on a CPU: the failure path
        failing, working = train("tld-101m", "cudnn", "conv"), train("tld-101m", "xla", "shift")
        scanned = train("tld-101m", "xla", "shift", scan=True)
        return [failing, working, scanned, sample, reader, largest]
    out = [train("tld-101m", a, d) for a in ("cudnn", "xla") for d in ("conv", "shift")]
    out += [train("xl-600m", "cudnn", "conv"), train("xl-600m", "cudnn", "conv", remat=True)]
    # The compile time of the 32-block step with the blocks as one lax.scan.
    out += [train("xl-600m", "cudnn", "conv", remat=True, scan=True)]
    out += [sample, reader]
    out += [train("at1", a, "auto") for a in ("cudnn", "xla")]
    return [*out, largest]


def _train_config(preset: str, batch: int, **model):
    from at1_jax.train.config import DataConfig, OptimConfig, TrainConfig

    m = dataclasses.replace(get_preset(preset), dtype="bfloat16", **model)
    return TrainConfig(
        steps=1000,
        model=m,
        data=DataConfig(path="synthetic", batch_size=batch),
        optim=OptimConfig(clip_norm=1.0),
    )


def run_train(p: dict, steps: int) -> dict:
    cfg = _train_config(
        p["preset"],
        p["batch"],
        attention=p["attention"],
        depthwise=p["depthwise"],
        remat=p["remat"],
        scan_blocks=p.get("scan", False),
    )
    return {"batch": p["batch"], **bench_train(cfg, steps)}


def run_max_batch(p: dict, steps: int, deadline: float) -> dict:
    """Doubles the batch from `start` until a step fails (out of memory), `limit` or time."""
    best, batch, last_error = None, p["start"], None
    while batch <= p["limit"] and time.monotonic() < deadline:
        try:
            cfg = _train_config(p["preset"], batch, attention="auto", remat=True)
            r = bench_train(cfg, steps)
        except Exception as e:  # out of memory ends the search
            last_error = _one_line(e)
            break
        best = {"batch": batch, **r}
        batch *= 2
        _free()
    if best is None:
        raise RuntimeError(f"no batch from {p['start']} fits: {last_error}")
    return {**best, "next_batch_error": last_error}


def run_sample(p: dict, smoke: bool) -> dict:
    cfg = dataclasses.replace(get_preset(p["preset"]), dtype="bfloat16")
    return bench_sample(cfg, batch=2 if smoke else 16, steps=2 if smoke else 20, guidance=6.0)


def run_reader(p: dict, smoke: bool, step_images_per_s: float | None) -> dict:
    """Images/s of the real shard reader over local shards (fp16 latents, pooled text)."""
    from at1_io.synthetic import make_dataset
    from at1_jax.train import data

    cfg = get_preset(p["preset"])
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    shards, per_shard, batch = (2, 8, 4) if smoke else (8, 512, 256)
    with tempfile.TemporaryDirectory(prefix="at1-bench-reader-") as root:
        make_dataset(root, shards, per_shard, shape, cfg.text_dim, val_prompts=0)
        ds = data.open_dataset(root)
        streams = data.local_streams(ds, 1, 0, True, 0, 1)
        start = [data.Position(0, 0, 0)]
        reader = data.BatchReader(streams, batch, start, prefetch=4)
        try:
            reader.next()  # thread start and first shard
            n = shards * per_shard // batch * 2  # two epochs
            t0 = time.perf_counter()
            for _ in range(n):
                reader.next()
            dt = time.perf_counter() - t0
        finally:
            reader.close()
    out = {"batch": batch, "images_per_s": n * batch / dt}
    if step_images_per_s:
        out["step_images_per_s"] = step_images_per_s
        out["reader_over_step"] = out["images_per_s"] / step_images_per_s
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _free():
    gc.collect()
    jax.clear_caches()


def run_suite(out_dir: str, smoke: bool, budget_s: float) -> dict:
    """Runs every case (budget permitting) and writes report.json and report.md."""
    start = time.monotonic()
    deadline = start + budget_s
    steps = 1 if smoke else 10
    dev = jax.devices()[0]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": f"{dev.device_kind} x{jax.device_count()} ({jax.default_backend()})",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "smoke": smoke,
        "cases": [],
    }
    best_step = None
    for case in cases(smoke):
        row: dict[str, Any] = {"name": case.name, "kind": case.kind}
        if time.monotonic() > deadline:
            row["status"] = "skipped: time budget spent"
            report["cases"].append(row)
            continue
        t0 = time.monotonic()
        try:
            if case.kind == "train":
                result = run_train(case.params, steps)
                if case.params["preset"] in ("tld-101m", SMOKE_PRESET):
                    best_step = max(best_step or 0, result["images_per_s"])
            elif case.kind == "max_batch":
                result = run_max_batch(case.params, steps, deadline)
            elif case.kind == "sample":
                result = run_sample(case.params, smoke)
            else:
                result = run_reader(case.params, smoke, best_step)
            row.update(status="ok", **result)
        except Exception as e:  # recorded, and the suite goes on
            row.update(status="failed", error=_one_line(e))
        row["wall_s"] = time.monotonic() - t0
        report["cases"].append(row)
        print(_md_row(row), flush=True)
        _free()
    report["total_s"] = time.monotonic() - start
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    return report


COLUMNS = (
    ("batch", "batch", "{}"),
    ("images_per_s", "img/s", "{:.1f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("tflops_per_s", "model TFLOP/s", "{:.1f}"),
    ("peak_device_gib", "peak dev GiB", "{:.2f}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("denoise_s", "denoise s", "{:.2f}"),
    ("decode_s", "decode s", "{:.2f}"),
    ("reader_over_step", "reader/step", "{:.1f}x"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    return "" if v is None else fmt.format(v)


def _md_row(row: dict) -> str:
    status = row["status"] if row["status"] != "ok" else ""
    if row.get("error"):
        status = f"{row['status']}: {row['error']}"
    cells = [row["name"]] + [_cell(row, k, f) for k, _, f in COLUMNS] + [status]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def markdown(report: dict) -> str:
    """The report as a Markdown table with its date, device and versions."""
    head = ["case"] + [h for _, h, _ in COLUMNS] + ["status"]
    lines = [
        f"GPU suite, {report['date']}, {report['device']}, jax {report['jax']}, "
        f"python {report['python']}{' (CPU smoke run)' if report['smoke'] else ''}, "
        f"{report['total_s']:.0f} s",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    return "\n".join(lines + [_md_row(r) for r in report["cases"]]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        formatter_class=DefaultsHelpFormatter,
        prog="python -m at1_jax.bench.gpu_suite",
        description=__doc__,
    )
    p.add_argument("out", help="directory for report.json and report.md")
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes, for tests on a CPU")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting cases after this")
    args = p.parse_args(argv)
    if jax.default_backend() == "cpu" and not args.cpu_smoke:
        print("error: no GPU here (jax backend is cpu); pass --cpu-smoke to test the suite")
        return 2
    report = run_suite(args.out, args.cpu_smoke, args.budget_s)
    failed = [c["name"] for c in report["cases"] if c["status"] == "failed"]
    print(f"wrote {args.out}/report.json and report.md ({len(failed)} failed: {failed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
