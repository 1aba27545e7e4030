"""Shard streaming: deterministic order, exact positions, corrupt shards, bad datasets."""

import itertools
import json
import os

import numpy as np
import pytest

from at1_io import schema
from at1_io.synthetic import make_dataset
from at1_jax.train import data


@pytest.fixture
def ds(tmp_path):
    make_dataset(str(tmp_path), shards=6, per_shard=5)
    return data.open_dataset(str(tmp_path))


def _keys(stream, pos, n):
    out, end = [], pos
    for sample, end in itertools.islice(stream.iterate(pos), n):  # noqa: B007
        out.append(float(sample["latent_mean"].ravel()[0]))
    return out, end


def test_open_dataset_reads_manifest_facts(ds):
    assert ds.latent_name == "latent_mean" and ds.has_std
    assert ds.text_name == "clip_pooled" and ds.text_dim == 32
    assert ds.latent_shape == (4, 8, 8)
    assert ds.latent_scale == pytest.approx(1 / 8)  # VAE latents: the reference's /8


def test_each_epoch_visits_every_sample_once_in_a_seeded_order(ds):
    streams = [data.ShardStream(ds, i, 2, seed=3, block=2) for i in range(2)]
    epoch0 = [_keys(s, data.Position(), 15)[0] for s in streams]
    assert sorted(epoch0[0] + epoch0[1]) == sorted(set(epoch0[0] + epoch0[1]))
    assert len(set(epoch0[0] + epoch0[1])) == 30
    again = [
        _keys(data.ShardStream(ds, i, 2, seed=3, block=2), data.Position(), 15)[0] for i in range(2)
    ]
    assert again == epoch0
    other_seed = _keys(data.ShardStream(ds, 0, 2, seed=4, block=2), data.Position(), 15)[0]
    assert other_seed != epoch0[0]
    epoch1 = _keys(streams[0], data.Position(epoch=1), 15)[0]
    assert epoch1 != epoch0[0]


def test_a_position_resumes_exactly(ds):
    stream = data.ShardStream(ds, 0, 1, seed=0, block=4)
    full, _ = _keys(stream, data.Position(), 40)  # crosses blocks and an epoch boundary
    for cut in (1, 7, 20, 31):
        head, pos = _keys(stream, data.Position(), cut)
        tail, _ = _keys(stream, pos, 40 - cut)
        assert head + tail == full, cut


def test_corrupt_shard_is_skipped_and_counted(ds, caplog):
    victim = ds.manifest.shards[2]
    path = os.path.join(ds.root, victim.path)
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])  # a half-written shard
    stream = data.ShardStream(ds, 0, 1, seed=0, block=6)
    samples, _ = _keys(stream, data.Position(), 25)
    assert len(set(samples)) == 25  # the 5 samples of the bad shard are gone, nothing repeats
    assert list(stream.skipped_shards) == [victim.name]
    assert "size or sha256 differs" in stream.skipped_shards[victim.name]
    assert f"skipping shard {victim.name}" in caplog.text


def test_all_shards_corrupt_is_an_error_not_a_hang(tmp_path):
    make_dataset(str(tmp_path), shards=2, per_shard=3)
    for name in os.listdir(tmp_path / "shards"):
        (tmp_path / "shards" / name).write_bytes(b"junk")
    stream = data.ShardStream(data.open_dataset(str(tmp_path)), 0, 1, seed=0, block=1)
    with pytest.raises(data.DataError, match="read no valid sample in epoch 0"):
        next(stream.iterate(data.Position()))


def test_fewer_shards_than_streams_is_a_clear_error(tmp_path):
    make_dataset(str(tmp_path), shards=2, per_shard=3)
    with pytest.raises(data.DataError, match="2 shards for 4 reading streams"):
        data.local_streams(data.open_dataset(str(tmp_path)), 4, 0, 1, 0, 4)


def test_batches_concatenate_hosted_streams_and_track_positions(ds):
    streams = data.local_streams(ds, 2, seed=0, block=2, process=0, processes=1)
    reader = data.BatchReader(streams, 3, [data.Position()] * 2, prefetch=2)
    try:
        b = reader.next()
        assert b["latent"].shape == (6, 4, 8, 8) and b["latent"].dtype == np.float16
        assert b["latent_std"].shape == (6, 4, 8, 8) and b["text"].shape == (6, 32)
        expect0, pos0 = _keys(streams[0], data.Position(), 3)
        expect1, pos1 = _keys(streams[1], data.Position(), 3)
        np.testing.assert_array_equal(b["latent"][:, 0, 0, 0].astype(float), expect0 + expect1)
        assert reader.positions == [pos0, pos1]
    finally:
        reader.close()


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.pop("shards"), "missing field 'shards'"),
        (lambda m: m.update(shards=[]), "lists no complete shards"),
        (lambda m: m["arrays"].pop("latent_mean"), "no latent_mean or latent array"),
        (lambda m: m["arrays"].pop("clip_pooled"), "text array '' is not a pooled"),
    ],
)
def test_bad_manifests_name_the_file(tmp_path, edit, message):
    make_dataset(str(tmp_path), shards=2, per_shard=2)
    path = tmp_path / schema.MANIFEST_NAME
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    with pytest.raises(data.DataError) as err:
        data.open_dataset(str(tmp_path))
    assert message in str(err.value) and "manifest.json" in str(err.value)


def test_missing_dataset_says_what_to_do(tmp_path):
    with pytest.raises(
        data.DataError, match=r"not found: is data\.path a dataset made by data_prep\.encode"
    ):
        data.open_dataset(str(tmp_path / "none"))


def test_pixel_datasets_are_not_rescaled(tmp_path):
    make_dataset(str(tmp_path), shards=1, per_shard=2, latent_shape=(3, 8, 8), pixel=True)
    assert data.open_dataset(str(tmp_path)).latent_scale == 1.0


def test_unreachable_storage_stops_the_stream_instead_of_skipping(
    tmp_path, s3_env, request, monkeypatch
):
    make_dataset(str(tmp_path), shards=2, per_shard=3)
    client = s3_env.client()
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            path = os.path.join(folder, name)
            client.upload_file(
                path, s3_env.bucket, f"{request.node.name}/{path[len(str(tmp_path)) + 1 :]}"
            )
    ds = data.open_dataset(s3_env.url(request.node.name))
    stream = data.ShardStream(ds, 0, 1, seed=0, block=1)
    assert len(_keys(stream, data.Position(), 6)[0]) == 6  # reachable: every sample
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(data.DataError) as err:
        next(stream.iterate(data.Position()))
    assert isinstance(err.value, data.StorageUnavailable)  # exit 1 (rerun), not 2 (bad data)
    assert f"cannot read shard {s3_env.url(request.node.name)}/shards/" in str(err.value)
    assert "EndpointConnectionError" in str(err.value) and "No shard was skipped" in str(err.value)
    assert stream.skipped_shards == {}  # a storage outage is not a bad shard


def test_batches_count_what_was_taken_by_licence_and_source(tmp_path):
    make_dataset(str(tmp_path), shards=4, per_shard=5, licenses=("cc0", "cc-by", "cc-by-nc"))
    ds = data.open_dataset(str(tmp_path))
    streams = data.local_streams(ds, 2, seed=1, block=2, process=0, processes=1)
    # The samples of the first two batches, straight from the streams: 2 × 3 per stream.
    taken = [s for st in streams for s, _ in itertools.islice(st.iterate(data.Position()), 6)]
    licenses = {}
    for s in taken:
        licenses[s[data.LICENSE_KEY]] = licenses.get(s[data.LICENSE_KEY], 0) + 1
    reader = data.BatchReader(streams, 3, [data.Position()] * 2, prefetch=3)
    try:
        assert reader.consumed == data.Consumed()
        reader.next()
        assert reader.consumed.samples == 6
        reader.next()
        # Batches read ahead by the thread are not counted until they are taken.
        assert reader.consumed == data.Consumed(12, licenses, {"synthetic": 12})
        assert sum(licenses.values()) == 12 and set(licenses) <= {"cc0", "cc-by", "cc-by-nc"}
    finally:
        reader.close()


def test_consumed_counts_add_and_round_trip_through_json():
    a = data.Consumed(3, {"cc0": 2, "unknown": 1}, {"s1": 3})
    b = data.Consumed(2, {"cc0": 2}, {"s2": 2})
    total = a.plus(b)
    assert total == data.Consumed(5, {"cc0": 4, "unknown": 1}, {"s1": 3, "s2": 2})
    assert data.Consumed.from_dict(json.loads(json.dumps(total.to_dict()))) == total
    assert data.Consumed.from_dict(None) == data.Consumed()  # a checkpoint from before counting
    assert data.gather_consumed(total) == total  # one process: nothing to add
    with pytest.raises(data.DataError, match=r"'consumed' is not \{samples, licenses, sources\}"):
        data.Consumed.from_dict({"samples": 1, "licenses": {"cc0": "1"}, "sources": {}})


def strip_provenance(root):
    """Rewrite a synthetic data set as the data stage wrote it before licences and sources."""
    path = os.path.join(root, schema.MANIFEST_NAME)
    m = json.loads(open(path).read())
    manifest = schema.load_manifest(open(path).read())
    shards = []
    for shard, raw in zip(manifest.shards, m["shards"], strict=True):
        file = os.path.join(root, shard.path)
        samples = list(schema.iter_shard_samples(open(file, "rb").read(), shard.name))
        for s in samples:
            s["json"] = {"index": s["json"]["index"]}
        with open(file, "wb") as f:
            schema.write_shard(f, samples)
        blob = open(file, "rb").read()
        raw.update(sha256=schema.sha256_bytes(blob), size_bytes=len(blob))
        raw.pop("source")
        shards.append(raw)
    for key in ("sources", "splits", "val_shards"):
        m.pop(key, None)
    m.update(shards=shards, licenses={})
    open(path, "w").write(json.dumps(m))


def test_samples_without_licence_or_source_records_count_as_unknown(tmp_path):
    make_dataset(str(tmp_path), shards=2, per_shard=3)
    strip_provenance(str(tmp_path))
    ds = data.open_dataset(str(tmp_path))
    streams = data.local_streams(ds, 1, seed=0, block=2, process=0, processes=1)
    reader = data.BatchReader(streams, 6, [data.Position()], prefetch=1)
    try:
        reader.next()
        assert reader.consumed == data.Consumed(6, {"unknown": 6}, {"unknown": 6})
    finally:
        reader.close()
    assert data.training_licenses(ds) == {"unknown": 6}
    assert data.check_licenses(ds, frozenset({"cc0", "unknown"})) == {"unknown": 6}
    with pytest.raises(data.DataError) as err:
        data.check_licenses(ds, frozenset({"cc0", "cc-by"}))
    msg = str(err.value)
    assert "config.data.licenses=cc-by,cc0 does not allow: unknown (6 samples)" in msg
    assert "refused unless data.licenses includes unknown" in msg
    assert msg.endswith("--config.data.licenses=cc-by,cc0,unknown")


def test_licences_outside_the_allowed_set_are_named_with_the_override(tmp_path):
    make_dataset(str(tmp_path), shards=2, per_shard=4, val_shards=1, licenses=("cc0", "cc-by-nc"))
    ds = data.open_dataset(str(tmp_path))
    # The training split only (8 samples); the held-out shard is not trained on.
    assert data.training_licenses(ds) == {"cc-by-nc": 4, "cc0": 4}
    with pytest.raises(data.DataError) as err:
        data.check_licenses(ds, frozenset({"cc0", "pdm", "cc-by", "cc-by-sa"}))
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path}/manifest.json: the training split holds licences")
    assert "does not allow: cc-by-nc (4 samples)" in msg and "unknown" not in msg
    assert msg.endswith("--config.data.licenses=cc-by,cc-by-nc,cc-by-sa,cc0,pdm")
    assert data.check_licenses(ds, frozenset({"cc0", "cc-by-nc"})) == {"cc-by-nc": 4, "cc0": 4}
