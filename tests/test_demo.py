"""The built-in default job end to end, at a tiny scale (the full run is `make demo`)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.timeout(1000)  # above the 900 s the test gives the demo itself
def test_demo_runs_every_stage_and_reports_adherence(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "at1_demo", "--out", str(out), "--num-images", "96"]
    proc = subprocess.run(
        [*cmd, "--steps", "4"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "adherence.json").read_text())
    # The scorer reads the training images back almost perfectly, whatever the model learnt.
    assert report["training_images"]["mean"] > 0.95
    assert report["num_generated"] == 2 * 48  # 48 held-out prompts, 2 images each
    assert set(report["timings_s"]) == {"data", "prep", "train", "generate", "evaluate", "total"}
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["autoencoder"]["kind"] == "pixel"
    assert (out / "generated" / "grid.png").is_file()
    assert (out / "run" / "weights" / "params.safetensors").is_file()
    assert "prompt adherence" in proc.stdout
    assert proc.stdout.strip().splitlines()[-2:] == [
        "labelled sheets of the held-out generations: grid.png, grid-2.png in "
        f"{out / 'generated'}",  # 96 images: two pages of 48
        f"type your own prompts: {sys.executable} -m at1_jax.serve {out / 'run'}",
    ]
    # A held-out tenth: 96 images in shards of 9 make 11 groups (the last of 6), one held out.
    assert manifest["val_num_samples"] in (6, 9) and len(manifest["val_shards"]) == 1
    assert manifest["num_samples"] + manifest["val_num_samples"] == 96
    rows = [json.loads(line) for line in (out / "run" / "scalars.jsonl").read_text().splitlines()]
    [val_row] = [r for r in rows if "val_loss" in r]  # 4 steps: only the end's validation
    assert val_row["step"] == 4 and 0 < val_row["val_loss_ema"] < 10
    assert (out / "run" / "curves.png").is_file()
    check_model_card(out, manifest, val_row, proc.stdout)
    check_tune(out)


def check_tune(out):
    """Settings are chosen on the validation prompts: disjoint from the test and the images."""
    cmd = [sys.executable, "-m", "at1_demo.tune", "--out", str(out), "--guidance", "1,5"]
    proc = subprocess.run(
        [*cmd, "--sampler-steps", "2", "--num-images", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "tune.json").read_text())
    assert report["prompts"] == "validation"
    rows = report["rows"]
    assert sorted((r["guidance"], r["steps"], r["sampler"]) for r in rows) == [
        (1.0, 2, "dpmpp2m"),
        (5.0, 2, "dpmpp2m"),
    ]
    assert rows[0]["mean"] >= rows[1]["mean"]  # best first
    assert all(0 <= r[f] <= 1 for r in rows for f in ("background", "shape", "mean"))
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["sampler", "steps", "guidance"] and len(lines) == 4
    validation = (out / "shapes" / "validation.txt").read_text().splitlines()
    held_out = (out / "shapes" / "held_out.txt").read_text().splitlines()
    trained = {p.read_text() for p in (out / "shapes" / "images").glob("*.txt")}
    assert len(validation) == 48 and not set(validation) & (set(held_out) | trained)
    bad = subprocess.run(
        [*cmd[:3], "--out", str(out / "nowhere")], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: "), bad.stderr
    assert "validation.jsonl not found" in bad.stderr and bad.stderr.count("\n") == 1


def check_model_card(out, manifest, val_row, stdout):
    """The exported weights' card, field by field, against the run's own records."""
    from safetensors.numpy import load_file

    run = out / "run"
    card = json.loads((run / "weights" / "model_card.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert card["card_version"] == 1 and card["name"] == "demo"
    assert card["origin"] == {"kind": "trained", "run_dir": str(run)}
    assert card["model"]["architecture"] == config["model"]
    arrays = load_file(str(run / "weights" / "params.safetensors"))
    buffers = arrays["angular_speeds"].size  # the only non-trainable array
    assert card["model"]["parameters"] == sum(a.size for a in arrays.values()) - buffers
    training = card["training"]
    assert training["config"] == config  # the whole config; it holds no secrets
    assert (training["steps"], training["samples_seen"], training["batch_size"]) == (4, 256, 64)
    [d] = card["data"]
    assert d["root"] == str(out / "data")
    train_split = manifest["splits"]["train"]
    assert (d["train_samples"], d["val_samples"]) == (
        manifest["num_samples"],
        manifest["val_num_samples"],
    )
    [source] = train_split["sources"]  # the one input folder
    assert d["consumed"] == {"samples": 256, "licenses": {"cc0": 256}, "sources": {source: 256}}
    assert d["licenses"] == train_split["licenses"] == {"cc0": manifest["num_samples"]}
    for field in ("captioning", "autoencoder", "text_encoders"):
        assert d[field] == manifest[field], field
    pooled = [name for name in manifest["arrays"] if name.endswith("_pooled")]
    assert d["autoencoder"]["kind"] == "pixel" and [d["text_array"]] == pooled
    licenses = card["licenses"]
    assert licenses["consumed"] == {"cc0": 256}
    assert licenses["allowed"] == ["cc0", "pdm", "cc-by", "cc-by-sa"]
    assert licenses["statement"].startswith(
        "The images these weights were trained on carried these licences (samples consumed "
        "by training, resumes counted once): cc0 256 (100.0%)."
    )
    val = card["validation"]
    samples = manifest["val_num_samples"]  # fewer than log.val_samples (256): all of them
    assert val["set"] == {"root": str(out / "data"), "split": "val", "samples": samples}
    assert {k: v for k, v in val.items() if k.startswith("val_loss")} == {
        k: v for k, v in val_row.items() if k.startswith("val_loss")
    }
    assert card["evaluations"] == [] and card["parent"] is None
    assert card["software"]["jax"] and card["created"].startswith("20")
    assert card["summary"].startswith("demo: prenorm width 128 depth 4 (")
    assert "4 steps, 256 samples from" in card["summary"]
    assert "licences cc0 256; val loss (EMA)" in card["summary"]
    md = (run / "weights" / "model_card.md").read_text()
    assert md.startswith(f"# Model card: demo\n\n{card['summary']}\n") and "## Licences" in md
    # sample printed the same one-line summary when it loaded the run.
    assert f"model: {card['summary']}" in stdout
