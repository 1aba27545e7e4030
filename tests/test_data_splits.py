"""The held-out validation split: whole groups, counts per split, resume, workers, --val-input."""

import json
import os

import pytest
from fixtures_images import write_image_folder
from test_data_inputs import _img2dataset_tar
from test_data_pipeline import _cli_args, read_dataset, settings

from at1_io import schema
from data_prep import pipeline, records, splits


def _read(root):
    return lambda shard: (root / shard.path).read_bytes()


def test_held_out_groups_are_deterministic_whole_and_spread():
    got = splits.held_out_groups(1000, 0.1, seed=0)
    assert got == splits.held_out_groups(1000, 0.1, seed=0)  # same listing, same split
    assert len(got) == 100 and got == sorted(set(got))
    # Spread over the listing, not one end of it: every quarter holds some.
    assert all(any(q * 250 <= g < (q + 1) * 250 for g in got) for q in range(4))
    assert set(got) < set(splits.held_out_groups(1000, 0.2, seed=0))  # a larger share adds
    assert got != splits.held_out_groups(1000, 0.1, seed=1)
    # Pinned: outputs record their split, but a change here changes every new one.
    assert splits.held_out_groups(20, 0.25, seed=0) == [4, 7, 9, 15, 18]
    assert splits.held_out_groups(4, 0.01, seed=0) == [3]  # at least one group
    assert splits.held_out_groups(4, 0.0, seed=0) == []
    with pytest.raises(ValueError, match="holds out 1 of the input's 1 groups, leaving none"):
        splits.held_out_groups(1, 0.1, seed=0)


def test_val_fraction_holds_out_whole_groups_and_counts_add_up(tiny_models, tmp_path):
    inp = tmp_path / "in"
    write_image_folder(inp, 8)  # shard size 2: groups 0..3; seed 1 holds out group 2
    (inp / "img004.json").write_text(json.dumps({"license": "CC0 1.0"}))
    (inp / "img005.json").write_text(json.dumps({"license": "CC BY-NC 2.0"}))  # skipped
    whole = pipeline.run(settings(tiny_models, inp, tmp_path / "whole", vae="pixel", seed=1))
    out = tmp_path / "split"
    s = settings(tiny_models, inp, out, vae="pixel", seed=1, val_fraction=0.25)
    m = pipeline.run(s).manifest
    assert records.read_run(str(out))["val_groups"] == [2]
    assert [(v.name, v.path) for v in m.val_shards] == [("00002-0000", "val/00002-0000.tar")]
    assert [t.name for t in m.shards] == ["00000-0000", "00001-0000", "00003-0000"]
    # Whole groups: every shard is the unsplit run's shard of that name, byte for byte.
    ref = {t.name: t for t in whole.manifest.shards}
    assert ref.keys() == {t.name for t in m.shards + m.val_shards}
    for t in m.shards + m.val_shards:
        assert (t.sha256, t.num_samples, t.size_bytes) == (
            ref[t.name].sha256, ref[t.name].num_samples, ref[t.name].size_bytes,
        )  # fmt: skip
    assert sorted(p.name for p in (out / "val").iterdir()) == ["00002-0000.tar"]
    assert not (out / "shards" / "00002-0000.tar").exists()

    loaded = schema.load_manifest((out / schema.MANIFEST_NAME).read_text())
    assert loaded == m
    val = list(schema.iter_split_samples(loaded, schema.VAL, _read(out)))
    train = list(schema.iter_split_samples(loaded, schema.TRAIN, _read(out)))
    assert [v["json"]["source"] for v in val] == ["img004.png"]
    assert [t["json"]["source"] for t in train] == [f"img00{i}.png" for i in (0, 1, 2, 3, 6, 7)]
    # Train + val = kept; each split's counts, and their sums at the top.
    src = os.path.abspath(inp)
    assert m.num_samples + m.val_num_samples == whole.manifest.num_samples == 7
    assert m.totals(schema.TRAIN) == schema.SplitTotals(
        6, 3, {"cc-by": 6}, {src: 6}, {"original": 6}, {}
    )
    assert m.totals(schema.VAL) == schema.SplitTotals(
        1, 1, {"cc0": 1}, {src: 1}, {"original": 1}, {"license_not_allowed": 1}
    )
    assert m.licenses == {"cc-by": 6, "cc0": 1} and m.sources == {src: 7}
    assert m.skipped == {"license_not_allowed": 1}
    assert {t.source for t in m.shards + m.val_shards} == {src}
    saved = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert saved["num_samples"] == 6 and saved["val_num_samples"] == 1
    assert saved["settings"]["val_fraction"] == 0.25 and saved["splits"]["val"]["num_shards"] == 1
    # The unsplit run has no validation split, and its train totals are everything.
    assert whole.manifest.val_shards == [] and set(whole.manifest.splits) == {schema.TRAIN}
    assert whole.manifest.totals(schema.TRAIN).licenses == {"cc-by": 6, "cc0": 1}


def test_resume_keeps_the_split_and_refuses_a_changed_one(tiny_models, tmp_path, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_image_folder(inp, 8)
    s = settings(tiny_models, inp, out, vae="pixel", seed=1, val_fraction=0.25)
    pipeline.run(s)
    manifest = (out / schema.MANIFEST_NAME).read_text()
    tars = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.tar")}
    # Killed after the validation shard's tar was published, before its record; group 3 never ran.
    for name, g in (("00002-0000", 2), ("00003-0000", 3)):
        (out / records.record_path(name)).unlink()
        (out / records.group_done_path(g)).unlink()
    (out / schema.MANIFEST_NAME).unlink()
    # The split recorded in run.json is kept even if the choice would now differ.
    monkeypatch.setattr(splits, "held_out_groups", lambda *a: [0])
    result = pipeline.run(s)
    assert result.written == ["00002-0000", "00003-0000"]
    assert result.resumed == ["00000-0000", "00001-0000"]
    assert (out / schema.MANIFEST_NAME).read_text() == manifest
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.tar")} == tars
    for changed in (dict(val_fraction=0.5), dict(val_fraction=0.0)):
        with pytest.raises(pipeline.SettingsMismatch, match=r"different settings \(val_fraction\)"):
            pipeline.run(settings(tiny_models, inp, out, vae="pixel", seed=1, **changed))


def test_outputs_and_manifests_from_before_the_split_still_work(tiny_models, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_image_folder(inp, 4)
    s = settings(tiny_models, inp, out, vae="pixel")
    pipeline.run(s)
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    # run.json and records as the data stage wrote them before the split existed.
    run = records.read_run(str(out))
    del run["val_groups"], run["settings"]["val_fraction"], run["settings"]["val_input"]
    (out / records.RUN_FILE).write_text(json.dumps(run))
    rec = json.loads((out / records.record_path("00000-0000")).read_text())
    del rec["source"]
    (out / records.record_path("00000-0000")).write_text(json.dumps(rec))
    (out / records.record_path("00001-0000")).unlink()
    (out / records.group_done_path(1)).unlink()
    result = pipeline.run(s)  # no settings change: the new settings had these values
    assert result.written == ["00001-0000"] and result.resumed == ["00000-0000"]
    m = result.manifest
    assert m.val_shards == [] and [t.source for t in m.shards] == ["", os.path.abspath(inp)]
    assert m.sources == {os.path.abspath(inp): 2}  # the older shard's source is unknown
    assert [t.sha256 for t in m.shards] == [t["sha256"] for t in manifest["shards"]]

    # A manifest written before the split: no val_shards, splits, sources or shard sources.
    for key in ("val_shards", "val_num_samples", "splits", "sources"):
        del manifest[key]
    for t in manifest["shards"]:
        del t["source"]
    old = schema.load_manifest(json.dumps(manifest))
    assert old.val_shards == [] and old.val_num_samples == 0 and old.sources == {}
    assert old.totals(schema.TRAIN) == schema.SplitTotals(
        4, 2, {"cc-by": 4}, {}, {"original": 4}, {}
    )
    assert old.totals(schema.VAL) == schema.SplitTotals(0, 0, {}, {}, {}, {})
    assert list(schema.iter_split_samples(old, schema.VAL, _read(out))) == []
    assert len(list(schema.iter_split_samples(old, schema.TRAIN, _read(out)))) == 4


def test_workers_and_merge_keep_the_split(tiny_models, tmp_path, capsys):
    from data_prep.encode import main

    inp = tmp_path / "in"
    write_image_folder(inp, 10)  # 5 groups; --val-fraction 0.4 holds out groups 3 and 4
    single, multi = tmp_path / "single", tmp_path / "multi"
    pipeline.run(settings(tiny_models, inp, single, vae="pixel", val_fraction=0.4))
    for w in (1, 0):
        kw = dict(vae="pixel", val_fraction=0.4, num_workers=2, worker_index=w)
        pipeline.run(settings(tiny_models, inp, multi, **kw))
    assert main(["merge", str(multi)]) == 0
    out = capsys.readouterr().out
    assert "manifest: 3 shards, 6 samples, validation split 4 samples in 2 shards" in out
    text = (multi / schema.MANIFEST_NAME).read_text()
    assert text == (single / schema.MANIFEST_NAME).read_text()
    m, _ = read_dataset(multi)
    assert [v.path for v in m.val_shards] == ["val/00003-0000.tar", "val/00004-0000.tar"]
    assert len(list(schema.iter_split_samples(m, schema.VAL, _read(multi)))) == 4


def test_tar_input_holds_out_whole_tars(tiny_models, tmp_path):
    inp, out = tmp_path / "tars", tmp_path / "out"
    inp.mkdir()
    for t in range(3):  # one group per tar; --val-fraction 0.34 holds out tar 2
        _img2dataset_tar(inp / f"{t:05d}.tar", 10 * t, 3 if t < 2 else 5)
    s = settings(tiny_models, inp, out, vae="pixel", val_fraction=0.34)
    m = pipeline.run(s).manifest
    assert [v.path for v in m.val_shards] == [
        "val/00002-0000.tar", "val/00002-0001.tar", "val/00002-0002.tar",
    ]  # fmt: skip
    keys = [v["__key__"] for v in schema.iter_split_samples(m, schema.VAL, _read(out))]
    assert keys == [f"00002_{c:04d}_{i:05d}" for c, i in ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0))]
    tar2 = str(inp / "00002.tar")
    assert m.totals(schema.VAL).sources == {tar2: 5}
    assert m.totals(schema.TRAIN).sources == {str(inp / "00000.tar"): 3, str(inp / "00001.tar"): 3}
    assert m.totals(schema.VAL).licenses == {"cc-by-sa": 5}
    # The held-out tar is replaced by a shorter one: its stale chunks leave val/ too.
    _img2dataset_tar(inp / "00002.tar", 40, 2)
    result = pipeline.run(s)
    assert result.written == ["00002-0000"]
    assert sorted(p.name for p in (out / "val").iterdir()) == ["00002-0000.tar"]
    assert read_dataset(out)[0].totals(schema.VAL).sources == {tar2: 2}


def test_val_input_is_encoded_as_the_split(tiny_models, tmp_path, capsys, monkeypatch):
    from data_prep.encode import main

    inp, val_in, out = tmp_path / "in", tmp_path / "val_in", tmp_path / "out"
    write_image_folder(inp, 3)
    write_image_folder(val_in, 3, license="CC0 1.0", seed=50)
    args = [*_cli_args(tiny_models, inp, out), "--shard-size", "2"]
    assert main([*args, "--val-input", str(val_in)]) == 0
    assert "validation split 3 samples in 2 shards" in capsys.readouterr().out
    m, train = read_dataset(out)
    # The validation input's groups follow the input's: 0, 1 train; 2, 3 validation.
    assert [t.name for t in m.shards] == ["00000-0000", "00001-0000"]
    assert [v.path for v in m.val_shards] == ["val/00002-0000.tar", "val/00003-0000.tar"]
    val = list(schema.iter_split_samples(m, schema.VAL, _read(out)))
    assert [v["json"]["source"] for v in val] == ["img000.png", "img001.png", "img002.png"]
    assert [t["json"]["license"] for t in train] == ["cc-by"] * 3
    want = {"train": ({"cc-by": 3}, inp), "val": ({"cc0": 3}, val_in)}
    for split, (lic, root) in want.items():
        totals = m.totals(split)
        assert totals.num_samples == 3 and totals.licenses == lic
        assert totals.sources == {os.path.abspath(root): 3}
    assert m.licenses == {"cc-by": 3, "cc0": 3} and m.settings["val_input"] == str(val_in)

    # A validation input that keeps nothing is an error, not a missing split.
    for p in (tmp_path / "val_in").glob("*.json"):
        p.unlink()
    empty = [*_cli_args(tiny_models, inp, tmp_path / "out2"), "--val-input", str(val_in)]
    assert main(empty) == 2
    err = capsys.readouterr().err
    assert "no validation sample kept: 3 of 3 input items skipped (license_missing 3)" in err
    assert not (tmp_path / "out2" / schema.MANIFEST_NAME).exists()

    monkeypatch.setattr(pipeline, "Models", None)  # every error below comes before the models
    cases = [
        (["--val-input", str(val_in), "--val-fraction", "0.1"], "give one"),
        (["--val-input", str(inp) + "/"], "is the input itself"),
        (["--val-input", str(inp) + "/../in"], "overlaps the input"),
        (["--val-input", str(tmp_path)], f"--val-input {tmp_path} overlaps the input {inp}"),
        (["--val-input", str(tmp_path / "nope")], "--val-input: input path not found"),
        (["--val-fraction", "1"], "--val-fraction 1.0: must be at least 0 and below 1"),
        (["--val-fraction", "nan"], "--val-fraction nan: must be at least 0"),
        (["--val-fraction", "0.5"], "holds out 1 of the input's 1 groups, leaving none"),
    ]
    for extra, message in cases:
        bad = [*_cli_args(tiny_models, inp, tmp_path / "bad"), "--shard-size", "10", *extra]
        assert main(bad) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    val_out = tmp_path / "val_in" / "ds"
    assert main([*_cli_args(tiny_models, inp, val_out), "--val-input", str(val_in)]) == 2
    assert f"inside the input folder {val_in}" in capsys.readouterr().err
