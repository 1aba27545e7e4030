"""Input formats: img2dataset tars (incl. truncated), parquet/JSONL tables, tfds data_source."""

import io
import json
import tarfile

import numpy as np
import pytest
from fixtures_images import png_bytes, random_rgb
from PIL import Image
from test_data_pipeline import read_dataset, reference_crop, settings

from data_prep import pipeline, sources


def _img2dataset_tar(path, start, n, license="CC BY-SA 4.0"):
    """An img2dataset-style tar: {key}.jpg/.txt/.json; returns the pixel arrays."""
    arrays = []
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            key = f"{i:09d}"
            a = random_rgb(40, 44, i)
            arrays.append(a)
            meta = {"url": f"http://img/{i}", "caption": f"c{i}", "license": license, "key": key}
            for ext, data in (
                ("png", png_bytes(Image.fromarray(a))),
                ("txt", f"a photo of a dog {i}".encode()),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return arrays


def test_img2dataset_tars_with_a_truncated_one(tiny_models, tmp_path):
    inp = tmp_path / "tars"
    inp.mkdir()
    arrays = _img2dataset_tar(inp / "00000.tar", 0, 3)
    _img2dataset_tar(inp / "00001.tar", 3, 3)
    full = (inp / "00001.tar").read_bytes()
    with tarfile.open(inp / "00001.tar") as tar:
        cut = tar.getmember("000000004.png").offset_data + 100
    # Cut inside the 2nd sample's image: sample 3 survives, 4 is lost, 5 never read.
    (inp / "00001.tar").write_bytes(full[:cut])
    (inp / "00000.parquet").write_bytes(b"img2dataset side files are ignored")
    pipeline.run(settings(tiny_models, inp, tmp_path / "out", vae="pixel"))
    m, samples = read_dataset(tmp_path / "out")
    assert [s.name for s in m.shards] == ["00000-0000", "00000-0001", "00001-0000"]
    assert [s["json"]["source"] for s in samples] == [
        "00000.tar/000000000", "00000.tar/000000001", "00000.tar/000000002", "00001.tar/000000003",
    ]  # fmt: skip
    assert m.skipped == {"partial_sample": 1, "truncated_input_tar": 1}  # sample 4 is counted
    assert m.licenses == {"cc-by-sa": 4}
    assert m.sources == {str(inp / "00000.tar"): 3, str(inp / "00001.tar"): 1}
    assert [s.source for s in m.shards] == [str(inp / "00000.tar")] * 2 + [str(inp / "00001.tar")]
    assert samples[1]["caption"] == "a photo of a dog 1"
    assert samples[1]["json"]["url"] == "http://img/1"
    assert samples[1]["json"]["source_meta"]["key"] == "000000001"
    np.testing.assert_allclose(samples[2]["latent_mean"], reference_crop(arrays[2]), atol=1e-3)


def _cut(path, member, into):
    """Cut a tar `into` bytes into the data of `member` (negative: into its header)."""
    with tarfile.open(path) as tar:
        m = tar.getmember(member)
    full = path.read_bytes()
    path.write_bytes(full[: (m.offset_data if into >= 0 else m.offset) + abs(into)])


def test_tars_cut_inside_a_sample_keep_only_whole_samples(tiny_models, tmp_path):
    inp = tmp_path / "tars"
    inp.mkdir()
    for t in range(3):
        _img2dataset_tar(inp / f"{t:05d}.tar", 3 * t, 3)
    _cut(inp / "00000.tar", "000000001.json", 10)  # sample 1 lost its license metadata
    _cut(inp / "00001.tar", "000000004.txt", 3)  # sample 4 lost its caption (and its json)
    # Cut inside the header after sample 7's json: nothing says sample 7 had no more members.
    _cut(inp / "00002.tar", "000000008.png", -100)
    s = settings(tiny_models, inp, tmp_path / "out", vae="pixel", licenses="any")
    pipeline.run(s)
    m, samples = read_dataset(tmp_path / "out")
    assert [smp["json"]["source"] for smp in samples] == [
        "00000.tar/000000000", "00001.tar/000000003", "00002.tar/000000006",
    ]  # fmt: skip
    assert m.skipped == {"partial_sample": 3, "truncated_input_tar": 3}
    assert m.licenses == {"cc-by-sa": 3}  # no sample of unknown license slipped through
    assert [smp["caption"] for smp in samples] == [f"a photo of a dog {i}" for i in (0, 3, 6)]


def test_empty_and_garbage_tars_are_bad_input(tiny_models, tmp_path, capsys):
    from test_data_pipeline import _cli_args

    from data_prep.encode import main

    inp = tmp_path / "tars"
    inp.mkdir()
    _img2dataset_tar(inp / "00000.tar", 0, 2)
    (inp / "00001.tar").write_bytes(b"")
    (inp / "00002.tar").write_bytes(b"<html>404 not found</html>" * 40)
    (inp / "00003.tar").write_bytes(bytes(10240))  # a valid tar without members
    full = tmp_path / "full"
    pipeline.run(settings(tiny_models, inp, full, vae="pixel"))
    m, samples = read_dataset(full)
    assert len(samples) == 2
    assert m.skipped == {"corrupt_input_tar": 1, "empty_input_tar": 2}
    for name in ("00000.tar", "00003.tar"):
        (inp / name).unlink()
    assert main(_cli_args(tiny_models, inp, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "no sample kept: 0 of 0 input items skipped, 2 input tars" in err
    assert "(corrupt_input_tar 1, empty_input_tar 1)" in err


def _table_rows(root):
    (root / "imgs").mkdir(parents=True)
    rows, arrays = [], []
    for i in range(3):
        a = random_rgb(36, 36, 10 + i)
        arrays.append(a)
        Image.fromarray(a).save(root / "imgs" / f"{i}.png")
        row = {"image": f"imgs/{i}.png", "caption": f"tree {i}", "license": 9, "url": f"u{i}"}
        rows.append(row)
    rows.append({"image": "imgs/missing.png", "caption": "gone", "license": 9, "url": "u9"})
    return rows, arrays


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_table_input(tiny_models, tmp_path, fmt):
    rows, arrays = _table_rows(tmp_path / "data")
    table = tmp_path / "data" / f"meta.{fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    else:
        table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pipeline.run(settings(tiny_models, table, tmp_path / "out", vae="pixel", shard_size=10))
    m, samples = read_dataset(tmp_path / "out")
    assert m.skipped == {"missing_image_file": 1} and m.licenses == {"cc0": 3}
    assert m.sources == {str(table): 3}
    assert [s["caption"] for s in samples] == ["tree 0", "tree 1", "tree 2"]
    assert samples[0]["json"]["url"] == "u0" and samples[0]["json"]["license_raw"] == "9"
    np.testing.assert_allclose(samples[1]["latent_mean"], reference_crop(arrays[1]), atol=1e-3)


def test_tfds_data_source(tiny_models, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        ref = tfds.data_source("beans", split="train")
        first, label = ref[0]["image"], ref[0]["label"]
        s = settings(
            tiny_models,
            "tfds:beans",
            tmp_path / "out",
            vae="pixel",
            caption_column="label",
            licenses="any",
            shard_size=10,
        )
        pipeline.run(s)
    m, samples = read_dataset(tmp_path / "out")
    assert m.num_samples == 3 and m.licenses == {"unknown": 3}
    assert m.sources == {"tfds:beans split train": 3}
    assert samples[0]["json"]["source"] == "beans[0]"
    assert samples[0]["caption"] == str(label)
    np.testing.assert_allclose(samples[0]["latent_mean"], reference_crop(first), atol=1e-3)


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(sources.SourceError, match="input path not found"):
        sources.open_source(str(tmp_path / "none"), "auto", 10)
    with pytest.raises(sources.SourceError, match="input path not found"):
        sources.open_source(str(tmp_path / "t.parquet"), "auto", 10)
    (tmp_path / "t.jsonl").write_text(json.dumps({"caption": "x"}) + "\n")
    with pytest.raises(sources.SourceError, match="no image column"):
        sources.open_source(str(tmp_path / "t.jsonl"), "auto", 10)
    with pytest.raises(sources.SourceError, match="not readable"):
        sources.open_source("tfds:no_such_dataset_xyz", "auto", 10)


def test_replaced_tar_is_encoded_again_without_stale_shards(tiny_models, tmp_path):
    inp, out = tmp_path / "tars", tmp_path / "out"
    inp.mkdir()
    _img2dataset_tar(inp / "00000.tar", 0, 5)
    _img2dataset_tar(inp / "00001.tar", 5, 1)
    s = settings(tiny_models, inp, out, vae="pixel")
    pipeline.run(s)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "00000-0000.tar", "00000-0001.tar", "00000-0002.tar", "00001-0000.tar",
    ]  # fmt: skip
    _img2dataset_tar(inp / "00000.tar", 10, 2)  # the same name, other samples
    result = pipeline.run(s)
    assert result.written == ["00000-0000"] and result.resumed == ["00001-0000"]
    _, samples = read_dataset(out)
    assert [smp["json"]["source"] for smp in samples] == [
        "00000.tar/000000010", "00000.tar/000000011", "00001.tar/000000005",
    ]  # fmt: skip
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "00000-0000.tar", "00001-0000.tar",
    ]  # fmt: skip
    assert not list((out / "parts").glob("00000-000[12].json"))


def test_folder_files_gone_after_listing_are_missing_not_empty(tmp_path):
    import os

    from fixtures_images import write_image_folder

    inp = tmp_path / "in"
    write_image_folder(inp, 3)
    os.symlink(tmp_path / "nowhere.png", inp / "link.png")  # a dangling symlink
    (inp / "empty.png").write_bytes(b"")
    src = sources.open_source(str(inp), "auto", 10)
    (inp / "img001.png").unlink()  # gone between listing and reading
    got = {item.source_id: item.skip_reason for item in src.iter_group(0)}
    assert got == {
        "empty.png": None,  # a real zero-byte file: decoding counts it as empty_image
        "img000.png": None,
        "img001.png": "missing_image_file",
        "img002.png": None,
        "link.png": "missing_image_file",
    }


def test_table_and_path_errors_name_the_file_and_line(tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text('{"image": "a.png"}\n\n[1, 2]\n')
    with pytest.raises(sources.SourceError, match=r"t\.jsonl line 3: a row must be a JSON object"):
        sources.open_source(str(table), "auto", 10)
    table.write_text('{"image": "a.png"}\n{"image": "b.png",\n')
    with pytest.raises(sources.SourceError, match=r"t\.jsonl line 2: not valid JSON"):
        sources.open_source(str(table), "auto", 10)
    table.write_bytes(b'{"image": "caf\xe9.png"}\n')
    with pytest.raises(sources.SourceError, match=r"t\.jsonl: not UTF-8"):
        sources.open_source(str(table), "auto", 10)
    (tmp_path / "t.parquet").write_bytes(b"not parquet")
    with pytest.raises(sources.SourceError, match=r"t\.parquet: not a readable parquet table"):
        sources.open_source(str(tmp_path / "t.parquet"), "auto", 10)
    (tmp_path / "cat.png").write_bytes(png_bytes(Image.fromarray(random_rgb(32, 32, 0))))
    for fmt in ("auto", "folder"):
        with pytest.raises(sources.SourceError, match=r"cat\.png is a file, not an image folder"):
            sources.open_source(str(tmp_path / "cat.png"), fmt, 10)
