"""S3 input and output against a real SeaweedFS server; unreachable endpoints fail up front."""

import dataclasses
import io
import os
import subprocess
import sys

import pytest
from fixtures_images import write_image_folder
from fixtures_s3 import free_ports
from test_data_pipeline import settings

from at1_io import schema, storage
from data_prep import pipeline, records


def _upload_folder(client, bucket, folder, prefix):
    for p in sorted(folder.iterdir()):
        client.upload_file(str(p), bucket, f"{prefix}/{p.name}")


def test_s3_in_and_out_round_trip(tiny_models, tmp_path, s3_env):
    client = s3_env.client()
    write_image_folder(tmp_path / "in", 3)
    _upload_folder(client, s3_env.bucket, tmp_path / "in", "e2e/in")
    out = s3_env.url("e2e/out")
    result = pipeline.run(settings(tiny_models, s3_env.url("e2e/in"), out))
    assert result.written == ["00000-0000", "00001-0000"]
    m = schema.load_manifest(storage.read_bytes(out + "/manifest.json"))
    assert m.num_samples == 3 and m.licenses == {"cc-by": 3}
    sources = []
    for shard in m.shards:
        body = client.get_object(Bucket=s3_env.bucket, Key=f"e2e/out/{shard.path}")["Body"].read()
        schema.verify_shard_bytes(body, shard)
        sources += [
            s["json"]["source"] for s in schema.iter_shard_samples(io.BytesIO(body), shard.name, m)
        ]
    assert sources == ["img000.png", "img001.png", "img002.png"]
    assert {shard.source for shard in m.shards} == {s3_env.url("e2e/in")}
    assert m.totals(schema.TRAIN).sources == {s3_env.url("e2e/in"): 3}
    # Same result locally: S3 does not change a byte (only the source names the other input).
    local = pipeline.run(settings(tiny_models, tmp_path / "in", tmp_path / "local"))
    assert [dataclasses.replace(s, source="") for s in local.manifest.shards] == [
        dataclasses.replace(s, source="") for s in m.shards
    ]
    # Resume on S3: drop the second shard's record; only it is redone.
    client.delete_object(Bucket=s3_env.bucket, Key="e2e/out/" + records.record_path("00001-0000"))
    client.delete_object(Bucket=s3_env.bucket, Key="e2e/out/" + records.group_done_path(1))
    again = pipeline.run(settings(tiny_models, s3_env.url("e2e/in"), out))
    assert again.written == ["00001-0000"] and again.resumed == ["00000-0000"]
    # A caption edited on S3 changes its group's listing (sizes): that group is encoded again.
    client.put_object(Bucket=s3_env.bucket, Key="e2e/in/img000.txt", Body=b"an edited caption")
    edited = pipeline.run(settings(tiny_models, s3_env.url("e2e/in"), out))
    assert edited.written == ["00000-0000"] and edited.resumed == ["00001-0000"]
    m = schema.load_manifest(storage.read_bytes(out + "/manifest.json"))
    body = client.get_object(Bucket=s3_env.bucket, Key=f"e2e/out/{m.shards[0].path}")["Body"]
    first = next(schema.iter_shard_samples(io.BytesIO(body.read()), m.shards[0].name, m))
    assert first["caption"] == "an edited caption" and m.num_samples == 3


def test_unreachable_endpoint_fails_before_work(tiny_models, tmp_path, s3_env, monkeypatch):
    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    write_image_folder(tmp_path / "in", 1)
    with pytest.raises(storage.StorageError, match=f"127.0.0.1:{port} unreachable"):
        pipeline.run(settings(tiny_models, tmp_path / "in", "s3://at1-test/never"))


def test_wrong_secret_and_missing_bucket_are_clear(tiny_models, tmp_path, s3_env, monkeypatch):
    write_image_folder(tmp_path / "in", 1)
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' not found"):
        pipeline.run(settings(tiny_models, tmp_path / "in", "s3://no-such-bucket/x"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(storage.StorageError) as e:
        pipeline.run(settings(tiny_models, tmp_path / "in", s3_env.url("denied")))
    assert "wrong-secret" not in str(e.value)


def test_cli_on_s3_never_prints_the_secret(tiny_models, tmp_path, s3_server):
    write_image_folder(tmp_path / "in", 2)
    env = {**os.environ, **s3_server.env()}
    out = s3_server.url("cli/out")
    cmd = [
        sys.executable,
        "-m",
        "data_prep.encode",
        str(tmp_path / "in"),
        out,
        "--vae",
        "pixel",
        "--text-encoder",
        f"clip={tiny_models.clip}",
        "--resolution",
        "16",
        "--min-size",
        "8",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "manifest: 2 samples in 1 shards" in r.stdout
    assert "img/s" in r.stderr  # the progress bar shows the rate
    assert s3_server.secret_key not in r.stdout + r.stderr
    assert s3_server.access_key not in r.stdout + r.stderr


def test_merge_errors_are_one_line(tiny_models, tmp_path, s3_env, monkeypatch, capsys):
    from data_prep.encode import main

    assert main(["merge", str(tmp_path / "none")]) == 2
    assert "is not an encode output (no parts/run.json)" in capsys.readouterr().err
    write_image_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    pipeline.run(settings(tiny_models, tmp_path / "in", out))
    (out / records.record_path("00001-0000")).write_text('{"name": ')
    assert main(["merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "parts/00001-0000.json is unreadable" in err and "delete it and rerun" in err
    (out / records.RUN_FILE).write_text("{")
    assert main(["merge", str(out)]) == 2
    assert "parts/run.json is unreadable" in capsys.readouterr().err
    with pytest.raises(records.RecordError, match=r"parts/run\.json is unreadable"):
        pipeline.run(settings(tiny_models, tmp_path / "in", out))
    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    assert main(["merge", "s3://at1-test/ds"]) == 2
    assert f"127.0.0.1:{port} unreachable" in capsys.readouterr().err
