"""Orbax checkpoints, local and on a real S3 server: keep-K, atomicity, re-sharding, outages."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_s3 import start_weed, stop_weed
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from at1_jax.checkpointing.checkpoints import CheckpointError, Checkpoints
from at1_jax.train import sharding


def _state(mesh):
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("fsdp", None)))
    return {"w": w, "step": jnp.int32(5), "nested": {"b": jnp.linspace(0, 1, 6)}}


def _abstract(mesh, spec):
    return {
        "w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, spec)),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
        "nested": {
            "b": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=sharding.replicated(mesh))
        },
    }


def _round_trip(path):
    mesh = sharding.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
    ck = Checkpoints(path, keep=2)
    for step in (10, 20, 30):
        ck.save(step, _state(mesh), {"step": step, "data_positions": [[0, 1, step]]})
    ck.wait()
    assert ck.steps() == [20, 30]  # keep=2 deleted the oldest
    # Restore onto another mesh and another layout: 4-way data-parallel, w split by rows.
    other = sharding.make_mesh(data=1, fsdp=4, devices=jax.devices()[:4])
    state, meta = ck.restore(ck.latest_step(), _abstract(other, P(None, "fsdp")))
    ck.close()
    assert meta == {"step": 30, "data_positions": [[0, 1, 30]]}
    np.testing.assert_array_equal(state["w"], np.arange(64.0).reshape(8, 8))
    assert state["w"].sharding.spec == P(None, "fsdp")
    assert int(state["step"]) == 5
    np.testing.assert_array_equal(state["nested"]["b"], np.linspace(0, 1, 6, dtype=np.float32))


def test_local_keep_restore_onto_another_mesh(tmp_path):
    _round_trip(str(tmp_path / "ckpt"))


def test_s3_keep_restore_onto_another_mesh(s3_env, request):
    _round_trip(s3_env.url(f"{request.node.name}/ckpt"))
    keys = [
        o["Key"]
        for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix=request.node.name)[
            "Contents"
        ]
    ]
    assert any(k.endswith("30/commit_success.txt") for k in keys)
    assert not any("/10/" in k for k in keys)


def test_interrupted_local_save_is_not_a_step(tmp_path):
    mesh = sharding.make_mesh(data=4, devices=jax.devices()[:4])
    ck = Checkpoints(str(tmp_path), keep=3)
    ck.save(1, _state(mesh), {"step": 1})
    ck.wait()
    ck.close()
    # What a process killed mid-save leaves: orbax's temporary folder.
    os.makedirs(tmp_path / "2.orbax-checkpoint-tmp-1234" / "state")
    assert Checkpoints(str(tmp_path)).steps() == [1]


def test_s3_step_without_commit_marker_is_not_a_step(s3_env, request):
    mesh = sharding.make_mesh(data=4, devices=jax.devices()[:4])
    url = s3_env.url(f"{request.node.name}/ckpt")
    ck = Checkpoints(url)
    ck.save(1, _state(mesh), {"step": 1})
    ck.wait()
    ck.close()
    # A killed save on S3 leaves objects under 2/ but never 2/commit_success.txt.
    client = s3_env.client()
    prefix = f"{request.node.name}/ckpt"
    for obj in client.list_objects_v2(Bucket=s3_env.bucket, Prefix=f"{prefix}/1/")["Contents"]:
        if not obj["Key"].endswith("commit_success.txt"):
            body = client.get_object(Bucket=s3_env.bucket, Key=obj["Key"])["Body"].read()
            client.put_object(Bucket=s3_env.bucket, Key=obj["Key"].replace("/1/", "/2/"), Body=body)
    assert Checkpoints(url).steps() == [1]


@pytest.mark.s3  # starts its own server, not through the s3_server fixture
def test_s3_server_going_away_keeps_the_last_checkpoint(tmp_path, monkeypatch, caplog):
    workdir = tmp_path / "weed"  # a server of its own: this test stops it
    proc, server = start_weed(workdir)
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        mesh = sharding.make_mesh(data=4, devices=jax.devices()[:4])
        url = server.url("outage/ckpt")
        ck = Checkpoints(url, retry_seconds=2)
        ck.save(1, _state(mesh), {"step": 1})
        ck.wait()
        big = {"w": jnp.ones((512, 1024))}  # 2 MiB: the upload is still running when S3 dies
        started = time.monotonic()
        with pytest.raises(CheckpointError) as err:
            ck.save(2, big, {"step": 2})
            stop_weed(proc)
            ck.wait()
        # 2 s of retries per request, a few requests in a row: far from orbax's 5-15 min.
        assert time.monotonic() - started < 30
        assert str(err.value).startswith("saving step 2 to s3://at1-test/outage/ckpt failed:")
        assert server.endpoint[len("http://") :] in str(err.value)
        retries = [r.getMessage() for r in caplog.records if "retry 1 of" in r.getMessage()]
        assert retries and "giving up 2 s after the first failure" in retries[0]
        ck.close()
    finally:
        stop_weed(proc)
    proc, server = start_weed(workdir)  # same data folder, new ports
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        ck = Checkpoints(url)
        assert ck.steps() == [1]
        state, meta = ck.restore(1, _abstract(mesh, P("fsdp", None)))
        assert meta["step"] == 1
        np.testing.assert_array_equal(state["w"], np.arange(64.0).reshape(8, 8))
    finally:
        stop_weed(proc)


def test_retry_seconds_must_be_positive(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoints {tmp_path}: retry seconds must be > 0"):
        Checkpoints(str(tmp_path), retry_seconds=0)


def test_an_s3_request_waits_no_longer_than_the_retry_budget_for_its_answer():
    # A short budget also shortens botocore's 60 s read timeout: a request stuck on a dead
    # server's connection kept a process alive a minute after its failure was reported.
    from at1_jax.checkpointing import retries, s3_orbax

    timeouts = [s3_orbax.read_timeout(retries.RetryPolicy(s)) for s in (2, 30, 120, 600)]
    assert timeouts == [5.0, 30.0, 60.0, 60.0]
