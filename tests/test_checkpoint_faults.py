"""Storage faults during checkpoint saves, and corrupt checkpoints (issue 12, items 17 and 19).

A real S3 server (SeaweedFS) is killed at exact points of a save: a proxy in front of it
kills the server when it sees the first request of a given kind, so "before", "during" and
"after the data writes" do not depend on timing. Saves run in worker processes (this file
run as a script): what is measured is how long the process takes to exit, since the
reported hang was orbax threads keeping a failed process alive.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
RETRY_SECONDS = 2.0
# A worker notices, reports and exits within the retry budget plus the slack of sequential
# requests each retried (a few budgets) on 2 busy cores; orbax alone waited 300 s to 15 min.
EXIT_BOUND_SECONDS = 40.0
# Kill points: the first request touching step 2; its first OCDBT data file upload (the
# array bytes, through TensorStore); its commit marker (everything else already written).
KILL_POINTS = {
    "before": rb"ckpt(/|%2F)2(/|%2F| )",
    "during": rb"PUT \S*/ckpt/2/state/ocdbt\.process_\d+/d/",
    "after": rb"PUT \S*/ckpt/2/commit_success\.txt",
}


class KillSwitch:
    """A TCP proxy to the S3 server that kills the server on the first matching request.

    The matching request is never forwarded; after the kill the proxy's port refuses
    connections, as a dead server's does.
    """

    def __init__(self, proc: subprocess.Popen, upstream: str, pattern: bytes):
        self.proc, self.pattern = proc, re.compile(pattern)
        self.upstream = int(upstream.rsplit(":", 1)[1])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.killed_at: float | None = None
        self.killed_by = b""
        self.requests: list[bytes] = []  # request lines seen, for failure messages
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed by kill()
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:  # killed meanwhile: the client sees its connection dropped
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, inspect: bool):
        try:
            while chunk := src.recv(1 << 16):
                if inspect:
                    for line in re.findall(rb"(?m)^[A-Z]+ \S+ HTTP/1\.1", chunk):
                        self.requests.append(line)
                        if self.pattern.search(line):
                            self.kill(line)
                            return
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def kill(self, line: bytes = b"") -> None:
        """SIGKILL the server and drop every connection."""
        with self._lock:
            if self.killed_at is not None:
                return
            self.proc.kill()
            self.proc.wait()
            self.killed_at, self.killed_by = time.monotonic(), line
            self.listener.close()
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass


def test_retry_schedule_default_is_two_minutes_and_reaches_tensorstore():
    from at1_jax.checkpointing.retries import RetryPolicy

    policy = RetryPolicy()
    assert policy.delays() == [1, 2, 4, 8, 16, 30, 30, 30]  # 121 s: ≥ the budget, once over
    assert policy.tensorstore_context() == {
        "s3_request_retries": {"max_retries": 8, "initial_delay": "1.0s", "max_delay": "30.0s"}
    }
    assert RetryPolicy(2.0).delays() == [0.25, 0.5, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="retry seconds must be > 0, got -1"):
        RetryPolicy(-1)


def test_retry_async_logs_each_retry_then_gives_up_naming_the_request(caplog):
    import asyncio

    from at1_jax.checkpointing.retries import RetryPolicy, StorageUnavailable, retry_async

    calls = []

    async def refused_twice():
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise ConnectionRefusedError("refused")
        return "ok"

    policy, what = RetryPolicy(1.0), "S3 put_object s3://b/k at http://h:1"
    transient = lambda e: isinstance(e, ConnectionError)  # noqa: E731
    with caplog.at_level(logging.WARNING, "at1_jax.checkpointing"):
        assert asyncio.run(retry_async(refused_twice, policy, what, transient)) == "ok"
    assert [r.getMessage() for r in caplog.records] == [
        f"{what} failed (ConnectionRefusedError: refused); retry {i} of 5 in {d:.1f} s, "
        "giving up 1 s after the first failure"
        for i, d in ((1, 0.125), (2, 0.25))
    ]
    assert calls[1] - calls[0] >= 0.125 and calls[2] - calls[1] >= 0.25

    async def refused():
        calls.append(time.monotonic())
        raise ConnectionRefusedError("refused")

    calls.clear()
    with pytest.raises(StorageUnavailable) as err:
        asyncio.run(retry_async(refused, policy, what, transient))
    assert str(err.value) == (
        f"{what}: no answer after 6 tries over 1 s (retry budget 1 s): "
        "ConnectionRefusedError: refused"
    )
    assert 1.0 <= calls[-1] - calls[0] < 1.5 and len(calls) == 6

    async def denied():
        calls.append(time.monotonic())
        raise PermissionError("AccessDenied")

    calls.clear()
    with pytest.raises(PermissionError):  # not transient: no retry
        asyncio.run(retry_async(denied, policy, what, transient))
    assert len(calls) == 1


def test_s3_errors_worth_retrying():
    from botocore.exceptions import ClientError, EndpointConnectionError

    from at1_jax.checkpointing.s3_orbax import _retryable

    def client_error(status: int, code: str) -> ClientError:
        response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "PutObject")

    wrapped = OSError("translated by s3fs")
    wrapped.__cause__ = client_error(503, "SlowDown")
    assert _retryable(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert _retryable(client_error(500, "InternalError")) and _retryable(wrapped)
    assert not _retryable(client_error(403, "SignatureDoesNotMatch"))
    assert not _retryable(FileNotFoundError("s3://b/k"))


def values(step: int) -> np.ndarray:
    """The array saved at `step`: random bits, so no codec hides a corruption."""
    return np.random.default_rng(step).standard_normal((512, 256), dtype=np.float32)


def _worker(mode: str, url: str, pid: int, nprocs: int, coordinator: str) -> int:
    """`save`: step 1, then step 2 (the test kills S3 during it). `restore`: the newest intact."""
    import jax

    if nprocs > 1:
        jax.distributed.initialize(coordinator, num_processes=nprocs, process_id=pid)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from at1_jax.checkpointing.checkpoints import CheckpointError, Checkpoints

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    spec = NamedSharding(jax.make_mesh((len(jax.devices()),), ("fsdp",)), P("fsdp"))

    def state(step: int) -> dict:
        v = values(step)
        return {"w": jax.make_array_from_callback(v.shape, spec, lambda i: v[i])}

    ck = Checkpoints(url, retry_seconds=RETRY_SECONDS)
    try:
        if mode == "restore":
            abstract = {"w": jax.ShapeDtypeStruct(values(0).shape, np.float32, sharding=spec)}
            step, restored, meta = ck.restore_latest(abstract)
            local = restored["w"].addressable_shards[0]
            exact = np.array_equal(np.asarray(local.data), values(step)[local.index])
            print(f"restored step {step} meta {json.dumps(meta)} exact {exact}", flush=True)
            return 0
        ck.save(1, state(1), {"step": 1})
        ck.wait()
        print("saved step 1", flush=True)
        ck.save(2, state(2), {"step": 2})
        ck.wait()
        print("saved step 2", flush=True)
        return 0
    except CheckpointError as e:
        print(f"error: {e}\nraised {type(e).__name__}", flush=True)
        return 2
    finally:
        ck.close()


def run_workers(mode: str, url: str, nprocs: int, env: dict) -> list[subprocess.Popen]:
    """`nprocs` worker processes forming one jax.distributed job (4 CPU devices in all)."""
    from fixtures_s3 import free_ports

    coordinator = f"127.0.0.1:{free_ports(1)[0]}"
    env = {
        **os.environ,
        **env,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // nprocs}",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    script = str(Path(__file__).resolve())
    return [
        subprocess.Popen(
            [sys.executable, script, mode, url, str(i), str(nprocs), coordinator],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(nprocs)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, float]]:
    """(exit code, output, monotonic time of exit) of each worker; SIGKILLs a hung one."""
    results, deadline = [], time.monotonic() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            raise AssertionError(f"worker {p.args[3]} hung:\n{out[-3000:]}") from None
        results.append((p.returncode, out, time.monotonic()))
    return results


def _names_endpoint(line: str, endpoint: str) -> bool:
    """s3fs says http://127.0.0.1:PORT, TensorStore (curl) says 127.0.0.1 port PORT."""
    port = endpoint.rsplit(":", 1)[1]
    return f"127.0.0.1:{port}" in line or f"127.0.0.1 port {port}" in line


def _kill_during_save(tmp_path, point: str, nprocs: int):
    """Run the save workers with S3 killed at `point`; check every process, then a restart."""
    from fixtures_s3 import start_weed, stop_weed

    import at1_jax.checkpointing.checkpoints as checkpoints

    workdir = tmp_path / "weed"
    proc, server = start_weed(workdir)
    try:
        switch = KillSwitch(proc, server.endpoint, KILL_POINTS[point])
        url = server.url("faults/ckpt")
        env = {**server.env(), "AWS_ENDPOINT_URL": switch.endpoint}
        results = finish(run_workers("save", url, nprocs, env))
        assert switch.killed_at is not None, f"never matched; requests: {switch.requests}"
        data_put = re.compile(rb"PUT \S*/ckpt/2/state/ocdbt\.process_\d+/d/")
        before_kill = switch.requests[: switch.requests.index(switch.killed_by)]
        data_written = [r for r in before_kill if data_put.search(r)]
        if point == "after":
            assert len(data_written) >= nprocs  # every process wrote its data before the kill
        else:
            assert not data_written
        for pid, (code, out, exited) in enumerate(results):
            assert code == 2, f"process {pid}:\n{out[-3000:]}"
            errors = [line for line in out.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, out[-3000:]
            assert errors[0].startswith(f"error: saving step 2 to {url} failed:"), errors[0]
            assert _names_endpoint(errors[0], switch.endpoint), errors[0]
            assert "raised CheckpointStorageError" in out  # the trainer's "rerun later" code
            assert exited - switch.killed_at < EXIT_BOUND_SECONDS, (pid, out[-3000:])
        retried = [out for _, out, _ in results if re.search(r"retry 1 of \d+ in", out)]
        assert retried, results[0][1][-3000:]
        if nprocs > 1 and point == "after":  # only process 0 writes the commit marker
            assert "failed: process 0: S3 put_object" in results[1][1]
    finally:
        stop_weed(proc)
    # The server comes back (same data, new ports): step 1 is intact and restores exactly.
    proc, server = start_weed(workdir)
    try:
        saved_env = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        ck = checkpoints.Checkpoints(url, read_only=True)
        assert ck.steps() == [1]
        import jax

        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = {"w": jax.ShapeDtypeStruct(values(0).shape, np.float32, sharding=one)}
        state, meta = ck.restore(1, abstract)
        ck.close()
        assert meta == {"step": 1}
        np.testing.assert_array_equal(np.asarray(state["w"]), values(1))
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_weed(proc)


@pytest.mark.s3
@pytest.mark.parametrize("point", ["before", "during", "after"])
def test_s3_killed_during_a_save_fails_it_within_the_retry_budget(tmp_path, point):
    _kill_during_save(tmp_path, point, nprocs=1)


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("point", ["before", "during", "after"])
def test_s3_killed_during_a_save_stops_every_process(tmp_path, point):
    _kill_during_save(tmp_path, point, nprocs=2)


@pytest.mark.s3
def test_s3_down_at_restore_is_a_storage_error_without_fallback(tmp_path, monkeypatch, caplog):
    from fixtures_s3 import start_weed, stop_weed

    from at1_jax.checkpointing.checkpoints import Checkpoints, CheckpointStorageError

    proc, server = start_weed(tmp_path / "weed")
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        url = server.url("down/ckpt")
        _save_steps(url)
        ck = Checkpoints(url, read_only=True, retry_seconds=RETRY_SECONDS)
        stop_weed(proc)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, "at1_jax.checkpointing"):
            with pytest.raises(CheckpointStorageError, match=f"restoring step 3 from {url} failed"):
                ck.restore_latest(_abstract(_state(0)))
        assert time.monotonic() - started < EXIT_BOUND_SECONDS
        assert not any("previous complete step" in r.getMessage() for r in caplog.records)
        with pytest.raises(CheckpointStorageError, match=f"cannot open checkpoint folder {url}"):
            Checkpoints(url, retry_seconds=RETRY_SECONDS)
    finally:
        stop_weed(proc)


def test_array_checksums_ignore_the_layout_and_see_one_flipped_bit():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from at1_jax.checkpointing import checksums

    x = np.random.default_rng(0).standard_normal((8, 12), dtype=np.float32)
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"))
    layouts = [
        jax.device_put(x, NamedSharding(mesh, P("fsdp", None))),
        jax.device_put(x, NamedSharding(mesh, P(None, ("data", "fsdp")))),
        jax.device_put(x, NamedSharding(mesh, P())),  # replicated: each block counts once
        jax.device_put(x, jax.devices()[3]),
    ]
    sums = {checksums.arrays({"x": a})["x"] for a in layouts}
    assert len(sums) == 1
    flipped = x.copy()
    flipped.view(np.uint32)[5, 7] ^= 1 << 9
    swapped = x.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]  # same values, other places
    for other in (flipped, swapped):
        assert checksums.arrays({"x": jnp.asarray(other)})["x"] not in sums
    others = {
        "bf16": jnp.asarray(x, jnp.bfloat16),
        "int": jnp.arange(10, dtype=jnp.int32),
        "bool": jnp.array([True, False]),
        "key": jax.random.key(3),
        "scalar": jnp.int32(5),
    }
    digests = checksums.arrays(others)
    assert sorted(digests) == sorted(others) and all(len(d) == 16 for d in digests.values())
    # CPU arrays are summed in numpy; accelerators run the same sums as XLA programs, here
    # forced onto the CPU devices: every layout and dtype gives the same numbers.
    for tree in ({"x": a} for a in layouts), [others]:
        for t in tree:
            assert checksums._local_sums(t, on_device=True) == checksums._local_sums(t)


def _state(step: int, extra: bool = False) -> dict:
    """values(step) sharded over the 4 test devices (with EMA/buffers for restore_params)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    spec = NamedSharding(jax.make_mesh((4,), ("fsdp",)), P("fsdp"))
    w = jax.device_put(values(step), spec)
    if not extra:
        return {"w": w}
    small = jax.device_put(np.full((4, 4), step, np.float32), spec)
    return {"params": {"w": small}, "ema": {"w": w}, "buffers": {"b": small}}


def _abstract(tree: dict) -> dict:
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _save_steps(url: str, extra: bool = False) -> None:
    from at1_jax.checkpointing.checkpoints import Checkpoints

    ck = Checkpoints(url)
    for step in (1, 2, 3):
        ck.save(step, _state(step, extra), {"step": step, "data_positions": [[0, 1, step]]})
    ck.wait()
    ck.close()


def _flip_64_bytes(data: bytes) -> bytes:
    """The bytes with 64 consecutive ones inverted, 3/8 into the file.

    In a data file that is inside a chunk's values, away from the zstd frame headers at
    the chunk boundaries (1/4, 1/2, 3/4 of a file of 4 equal chunks): TensorStore reads
    such a flip back without an error, the case only the checksums catch.
    """
    out = bytearray(data)
    start = len(out) * 3 // 8
    out[start : start + 64] = bytes(b ^ 0xFF for b in out[start : start + 64])
    return bytes(out)


def _corrupt_local(folder: Path, target: str) -> None:
    """Damage step 3 of a local checkpoint folder where `target` says."""
    if target == "meta":  # still valid JSON: only the checksum can tell
        f = folder / "3" / "meta" / "metadata"
        text = f.read_text()
        assert "[[0, 1, 3]]" in text
        f.write_text(text.replace("[[0, 1, 3]]", "[[0, 1, 9]]"))
        return
    pattern = {"data": "3/state/ocdbt.process_0/d/*", "index": "3/state/d/*"}[target]
    f = Path(max(glob.glob(str(folder / pattern)), key=os.path.getsize))
    f.write_bytes(_flip_64_bytes(f.read_bytes()))


@pytest.mark.parametrize("target", ["data", "index", "meta"])
def test_a_corrupt_latest_step_is_refused_and_resume_falls_back(tmp_path, caplog, target):
    from at1_jax.checkpointing.checkpoints import CheckpointError, Checkpoints

    folder = tmp_path / "ckpt"
    _save_steps(str(folder))
    _corrupt_local(folder, target)
    ck = Checkpoints(str(folder))
    abstract = _abstract(_state(0))
    with pytest.raises(CheckpointError, match=f"step 3 .*{folder}") as err:
        ck.restore(3, abstract)
    expected = {
        "data": "1 of 1 arrays differ from the checksums written at save (w)",
        "index": "Error decoding",  # TensorStore's own check of OCDBT nodes
        "meta": "its metadata does not match the checksum written at save",
    }[target]
    assert expected in str(err.value) and err.value.step == 3
    with caplog.at_level(logging.WARNING, "at1_jax.checkpointing"):
        step, state, meta = ck.restore_latest(abstract)
    assert step == 2 and meta == {"step": 2, "data_positions": [[0, 1, 2]]}
    np.testing.assert_array_equal(np.asarray(state["w"]), values(2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith(f"checkpoint step 3 of {folder} is corrupt") for m in warnings) or any(
        m.startswith(f"restoring step 3 from {folder} failed") for m in warnings
    ), warnings
    assert f"restored step 2 of {folder} instead of the newer corrupt step(s) 3" in warnings
    # The resumed run saves step 3 again: the corrupt one is replaced, not kept as the latest.
    ck.save(3, _state(3), {"step": 3, "data_positions": [[0, 1, 3]]})
    ck.wait()
    step, state, _ = ck.restore_latest(abstract)
    ck.close()
    assert step == 3
    np.testing.assert_array_equal(np.asarray(state["w"]), values(3))


def test_a_step_written_without_checksums_restores_with_a_warning(tmp_path, caplog):
    from at1_jax.checkpointing.checkpoints import Checkpoints

    folder = tmp_path / "ckpt"
    _save_steps(str(folder))
    f = folder / "3" / "meta" / "metadata"
    meta = json.loads(f.read_text())
    assert set(meta.pop("_integrity")) == {"arrays", "meta_sha256"}
    f.write_text(json.dumps(meta))  # what the checkpoints of older versions hold
    ck = Checkpoints(str(folder), read_only=True)
    with caplog.at_level(logging.WARNING, "at1_jax.checkpointing"):
        step, state, meta = ck.restore_latest(_abstract(_state(0)))
    ck.close()
    assert step == 3 and meta == {"step": 3, "data_positions": [[0, 1, 3]]}
    np.testing.assert_array_equal(np.asarray(state["w"]), values(3))
    assert [r.getMessage() for r in caplog.records if "checksums" in r.getMessage()] == [
        f"checkpoint step 3 of {folder} has no checksums (written before they were added): "
        "restored unverified"
    ]


def test_every_step_corrupt_is_an_error_naming_them(tmp_path):
    from at1_jax.checkpointing.checkpoints import CheckpointError, Checkpoints

    folder = tmp_path / "ckpt"
    _save_steps(str(folder))
    for step in (1, 2, 3):
        f = Path(
            max(glob.glob(str(folder / f"{step}/state/ocdbt.process_0/d/*")), key=os.path.getsize)
        )
        f.write_bytes(_flip_64_bytes(f.read_bytes()))
    ck = Checkpoints(str(folder), read_only=True)
    with pytest.raises(CheckpointError, match=f"no intact checkpoint in {folder}") as err:
        ck.restore_latest(_abstract(_state(0)))
    assert all(f"checkpoint step {s} of {folder} is corrupt" in str(err.value) for s in (1, 2, 3))


def test_s3_corrupt_latest_step_falls_back(s3_env, request, caplog):
    from at1_jax.checkpointing.checkpoints import Checkpoints

    url = s3_env.url(f"{request.node.name}/ckpt")
    _save_steps(url)
    client, prefix = s3_env.client(), f"{request.node.name}/ckpt/3/state/ocdbt.process_0/d/"
    objects = client.list_objects_v2(Bucket=s3_env.bucket, Prefix=prefix)["Contents"]
    key = max(objects, key=lambda o: o["Size"])["Key"]
    body = client.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read()
    client.put_object(Bucket=s3_env.bucket, Key=key, Body=_flip_64_bytes(body))
    ck = Checkpoints(url, read_only=True)
    with caplog.at_level(logging.WARNING, "at1_jax.checkpointing"):
        step, state, _ = ck.restore_latest(_abstract(_state(0)))
    ck.close()
    assert step == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), values(2))
    assert any(f"checkpoint step 3 of {url} is corrupt" in r.getMessage() for r in caplog.records)


def test_restore_params_skips_a_corrupt_latest_step(tmp_path, caplog):
    from at1_jax.checkpointing.checkpoints import restore_params

    folder = tmp_path / "ckpt"
    _save_steps(str(folder), extra=True)
    _corrupt_local(folder, "data")  # the largest array: the EMA weights
    full = _state(0, extra=True)
    abstract = _abstract({"params": full["ema"], "buffers": full["buffers"]})
    with caplog.at_level(logging.WARNING, "at1_jax.checkpointing"):
        restored, meta = restore_params(str(folder), abstract)
    assert meta["step"] == 2
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), values(2))
    np.testing.assert_array_equal(np.asarray(restored["buffers"]["b"]), np.full((4, 4), 2.0))
    assert any("step 3" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_fall_back_together(tmp_path):
    folder = tmp_path / "ckpt"
    _save_steps(str(folder))  # one process with 4 devices; restored by 2 processes with 2 each
    _corrupt_local(folder, "data")  # one chunk, read by one of the two processes
    results = finish(run_workers("restore", str(folder), 2, {}))
    for pid, (code, out, _) in enumerate(results):
        assert code == 0, out[-3000:]
        assert 'restored step 2 meta {"step": 2, "data_positions": [[0, 1, 2]]} exact True' in out
        assert f"checkpoint step 3 of {folder} is corrupt" in out, (pid, out[-3000:])


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
