"""The GPU suite runs every kind of case at toy sizes on a CPU and reports each one."""

import json

import pytest

from at1_jax.bench import gpu_suite


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_smoke_reports_every_case_and_survives_a_failing_one(tmp_path, capsys):
    assert gpu_suite.main([str(tmp_path), "--cpu-smoke"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["name"]: r for r in report["cases"]}
    assert [r["kind"] for r in report["cases"]] == [
        "train",
        "train",
        "train",
        "sample",
        "reader",
        "max_batch",
    ]
    failing = rows["tld-101m b4 attn=cudnn dw=conv"]
    assert failing["status"] == "failed" and "cuDNN" in failing["error"]  # no cuDNN on a CPU
    ok = [r for r in report["cases"] if r is not failing]
    assert all(r["status"] == "ok" for r in ok), ok
    train = rows["tld-101m b4 attn=xla dw=shift"]
    assert train["images_per_s"] > 0 and train["compile_s"] > 0 and train["batch"] == 4
    scanned = rows["tld-101m b4 attn=xla dw=shift scan"]  # the blocks as one lax.scan
    assert scanned["images_per_s"] > 0 and scanned["compile_s"] > 0
    reader = rows["shard reader vs tld-101m step"]
    assert reader["reader_over_step"] == pytest.approx(
        reader["images_per_s"] / train["images_per_s"]
    )
    assert rows["xl-600m largest batch (remat)"]["batch"] == 8  # the limit of the smoke run
    sample = rows["sampler dpm++ 20 steps g6 + SDXL VAE"]
    assert sample["image_shape"] == [16 * 8, 16 * 8, 3]  # tld-tiny latents through the x8 VAE
    assert sample["denoise_s"] > 0 and sample["decode_s"] > 0
    md = (tmp_path / "report.md").read_text()
    assert md.count("\n| ") == 1 + len(rows) and "failed: RuntimeError" in md


def test_cases_past_the_budget_are_recorded_as_skipped(tmp_path):
    report = gpu_suite.run_suite(str(tmp_path), smoke=True, budget_s=0)
    assert len(report["cases"]) == 6
    assert {r["status"] for r in report["cases"]} == {"skipped: time budget spent"}
    assert json.loads((tmp_path / "report.json").read_text())["cases"] == report["cases"]


def test_full_size_plan_covers_the_issue(capsys):
    names = [c.name for c in gpu_suite.cases(smoke=False)]
    assert names[:4] == [
        f"tld-101m b256 attn={a} dw={d}" for a in ("cudnn", "xla") for d in ("conv", "shift")
    ]
    assert "xl-600m b128 attn=cudnn dw=conv remat" in names and names[-1].startswith("xl-600m")
    assert "xl-600m b128 attn=cudnn dw=conv remat scan" in names
    assert gpu_suite.main(["/nonexistent", "--budget-s", "1"]) == 2  # this machine has no GPU
    assert "no GPU here" in capsys.readouterr().out
