"""The pure-numpy shard format: round trips, validation errors, no torch, webdataset compat."""

import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from at1_io import schema


def _sample(key, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "__key__": key,
        "latent_mean": rng.standard_normal((4, 2, 2)).astype(np.float16),
        "clip_mask": np.array([1, 1, 0], np.uint8),
        "caption": "ünïcode caption",
        "json": {"license": "cc-by", "n": seed},
    }


ARRAYS = {
    "latent_mean": schema.ArraySpec("latent_mean", (4, 2, 2), "float16"),
    "clip_mask": schema.ArraySpec("clip_mask", (3,), "uint8"),
}


def _tar(samples):
    buf = io.BytesIO()
    schema.write_shard(buf, samples)
    return buf.getvalue()


def test_round_trip_values_and_types():
    samples = [_sample("a_0", 0), _sample("a_1", 1)]
    out = list(schema.iter_shard_samples(_tar(samples), "s0", arrays=ARRAYS))
    assert [s["__key__"] for s in out] == ["a_0", "a_1"]
    for want, got in zip(samples, out, strict=True):
        np.testing.assert_array_equal(got["latent_mean"], want["latent_mean"])
        assert got["latent_mean"].dtype == np.float16
        assert got["caption"] == want["caption"]
        assert got["json"] == want["json"]


def test_write_is_reproducible():
    samples = [_sample("k", 3)]
    assert _tar(samples) == _tar(samples)


def test_webdataset_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    path = tmp_path / "s.tar"
    path.write_bytes(_tar([_sample("a_0", 0), _sample("a_1", 1)]))
    got = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == ["a_0", "a_1"]
    np.testing.assert_array_equal(got[1]["latent_mean.npy"], _sample("a_1", 1)["latent_mean"])
    assert got[0]["caption.txt"] == "ünïcode caption"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("clip_mask"), "missing array 'clip_mask'"),
        (lambda s: s.update(clip_mask=np.zeros(4, np.uint8)), "array 'clip_mask' is uint8[4]"),
        (lambda s: s.update(clip_mask=np.zeros(3, np.float16)), "float16[3], manifest says uint8"),
        (lambda s: s.pop("caption"), "missing caption"),
    ],
)
def test_validation_names_shard_and_key(mutate, message):
    bad = _sample("bad_key")
    mutate(bad)
    with pytest.raises(schema.SchemaError, match="shard s7 sample 'bad_key'") as e:
        list(schema.iter_shard_samples(_tar([_sample("ok"), bad]), "s7", arrays=ARRAYS))
    assert message in str(e.value)


def test_truncated_and_pickled_shards_are_rejected():
    data = _tar([_sample("a"), _sample("b")])
    with pytest.raises(schema.SchemaError, match="shard t"):
        # Cut inside the second member's data (tar pads the end with zero blocks).
        list(schema.iter_shard_samples(data[:1500], "t"))
    # Cut exactly at a member boundary: tarfile alone would call this a normal end.
    with pytest.raises(schema.SchemaError, match="truncated tar"):
        list(schema.iter_shard_samples(data[:1024], "t"))
    # A garbage header in the middle: tarfile's stream mode alone stops there silently.
    offsets = [i for i in range(0, len(data), 512) if data[i : i + 1] not in (b"\0", b"")]
    second_header = next(o for o in offsets if data[o : o + 2] == b"b.")
    bad = data[:second_header] + b"\x7f" * 512 + data[second_header + 512 :]
    with pytest.raises(schema.SchemaError, match="corrupt tar: an invalid header"):
        list(schema.iter_shard_samples(bad, "t"))
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("k.obj.npy")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(schema.SchemaError, match=r"cannot decode field 'obj\.npy'"):
        list(schema.iter_shard_samples(raw.getvalue(), "p"))


def test_keys_with_dots_are_refused():
    with pytest.raises(schema.SchemaError, match="without dots"):
        _tar([_sample("a.b")])


def _manifest_dict():
    m = schema.Manifest(
        schema_version=schema.SCHEMA_VERSION,
        arrays=ARRAYS,
        shards=[schema.ShardInfo("00000-0000", "shards/00000-0000.tar", 2, "ab", 10)],
        autoencoder={"kind": "pixel"},
        text_encoders=[],
        captioning=None,
        settings={},
        skipped={"corrupt_image": 1},
        repaired={},
        licenses={"cc-by": 2},
        license_rejected={},
        caption_origins={"original": 2},
    )
    return json.loads(schema.dump_manifest(m))


def test_manifest_round_trip_and_errors():
    d = _manifest_dict()
    m = schema.load_manifest(json.dumps(d))
    assert m.arrays == ARRAYS and m.num_samples == 2 and m.skipped == {"corrupt_image": 1}
    assert schema.load_manifest(schema.dump_manifest(m)) == m
    with pytest.raises(schema.SchemaError, match="schema_version 99"):
        schema.load_manifest(json.dumps({**d, "schema_version": 99}))
    del d["shards"][0]["sha256"]
    with pytest.raises(schema.SchemaError, match="shard #0: missing field 'sha256'"):
        schema.load_manifest(json.dumps(d))
    with pytest.raises(schema.SchemaError, match="not valid JSON"):
        schema.load_manifest("{")


def _split_manifest(tmp_path):
    """A manifest with two training shards and one validation shard written to tmp_path."""
    infos = {}
    for split, name, keys in (
        (schema.TRAIN, "00000-0000", ["a_0", "a_1"]),
        (schema.TRAIN, "00001-0000", ["b_0"]),
        (schema.VAL, "00002-0000", ["c_0", "c_1"]),
    ):
        folder = schema.SHARD_DIR if split == schema.TRAIN else schema.VAL_SHARD_DIR
        data = _tar([_sample(k, i) for i, k in enumerate(keys)])
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / f"{name}.tar").write_bytes(data)
        info = schema.ShardInfo(
            name, f"{folder}/{name}.tar", len(keys), schema.sha256_bytes(data), len(data), "/in"
        )
        infos.setdefault(split, []).append(info)
    totals = {
        schema.TRAIN: schema.SplitTotals(3, 2, {"cc-by": 3}, {"/in": 3}, {"original": 3}, {}),
        schema.VAL: schema.SplitTotals(2, 1, {"cc-by": 2}, {"/in": 2}, {"original": 2}, {}),
    }
    d = _manifest_dict()
    m = schema.load_manifest(json.dumps({**d, "licenses": {"cc-by": 5}, "sources": {"/in": 5}}))
    m.shards, m.val_shards, m.splits = infos[schema.TRAIN], infos[schema.VAL], totals
    return m


def test_split_manifest_round_trip_and_reader(tmp_path):
    m = _split_manifest(tmp_path)
    d = json.loads(schema.dump_manifest(m))
    assert (d["num_samples"], d["val_num_samples"]) == (3, 2)
    assert d["val_shards"][0]["path"] == "val/00002-0000.tar" and d["val_shards"][0]["source"]
    assert schema.load_manifest(json.dumps(d)) == m
    assert m.split_shards(schema.VAL) == m.val_shards and m.totals(schema.VAL).num_samples == 2

    def read(shard):
        return (tmp_path / shard.path).read_bytes()

    val = list(schema.iter_split_samples(m, schema.VAL, read))
    assert [v["__key__"] for v in val] == ["c_0", "c_1"]
    np.testing.assert_array_equal(val[1]["latent_mean"], _sample("c_1", 1)["latent_mean"])
    train = [t["__key__"] for t in schema.iter_split_samples(m, schema.TRAIN, read)]
    assert train == ["a_0", "a_1", "b_0"]
    with pytest.raises(schema.SchemaError, match="unknown split 'test': use one of train, val"):
        m.split_shards("test")

    # A validation shard changed on disk, or one the manifest miscounts, stops the reader.
    (tmp_path / "val" / "00002-0000.tar").write_bytes(_tar([_sample("c_0", 9), _sample("c_1")]))
    with pytest.raises(schema.SchemaError, match="shard 00002-0000: size or sha256 differs"):
        list(schema.iter_split_samples(m, schema.VAL, read))
    data = _tar([_sample("c_0")])
    (tmp_path / "val" / "00002-0000.tar").write_bytes(data)
    checksum = dict(sha256=schema.sha256_bytes(data), size_bytes=len(data))
    m.val_shards = [dataclasses.replace(m.val_shards[0], **checksum)]
    with pytest.raises(schema.SchemaError, match="holds 1 samples, the manifest says 2"):
        list(schema.iter_split_samples(m, schema.VAL, read))


def test_split_manifest_errors_name_the_field(tmp_path):
    d = json.loads(schema.dump_manifest(_split_manifest(tmp_path)))
    bad = json.loads(json.dumps(d))
    bad["splits"]["val"]["num_samples"] = 3
    with pytest.raises(
        schema.SchemaError,
        match=r"splits\['val'\]: 3 samples in 1 shards, but its shard list holds 2 in 1",
    ):
        schema.load_manifest(json.dumps(bad))
    bad = json.loads(json.dumps(d))
    bad["val_shards"][0]["name"] = "00000-0000"
    with pytest.raises(schema.SchemaError, match=r"duplicate shard names \['00000-0000'\]"):
        schema.load_manifest(json.dumps(bad))
    bad = json.loads(json.dumps(d))
    bad["splits"]["test"] = bad["splits"]["val"]
    with pytest.raises(schema.SchemaError, match=r"splits\['test'\]: unknown split"):
        schema.load_manifest(json.dumps(bad))
    bad = json.loads(json.dumps(d))
    del bad["val_shards"][0]["sha256"]
    with pytest.raises(schema.SchemaError, match="val shard #0: missing field 'sha256'"):
        schema.load_manifest(json.dumps(bad))
    bad = json.loads(json.dumps(d))
    bad["splits"]["train"]["sources"] = {"/in": "3"}
    with pytest.raises(schema.SchemaError, match=r"'sources' must map names to integer counts"):
        schema.load_manifest(json.dumps(bad))


def test_verify_shard_bytes():
    data = _tar([_sample("a")])
    info = schema.ShardInfo("x", "shards/x.tar", 1, schema.sha256_bytes(data), len(data))
    schema.verify_shard_bytes(data, info)
    with pytest.raises(schema.SchemaError, match="shard x"):
        schema.verify_shard_bytes(data[:-1] + b"\1", info)


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("at1_io.schema", ("torch", "jax", "webdataset", "PIL", "transformers")),
        ("at1_io.storage", ("torch", "jax", "webdataset", "PIL", "transformers")),
        ("at1_io.constants", ("torch", "jax", "numpy")),
        ("data_prep.encode", ("torch", "transformers", "diffusers")),  # fast --help and errors
    ],
)
def test_light_imports(module, forbidden):
    code = (
        f"import sys, {module}; "
        f"bad = [m for m in {forbidden!r} if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
