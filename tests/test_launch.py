"""Launchers: local multi-process and Ray runs end to end, manifests and scripts checked."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from fixtures_shards import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "launch_tinycfg.py")
TRAIN = [sys.executable, "-m", "at1_jax.train", "--config", TINY]
SCRIPTS = ["launch/entrypoint.sh", "launch/slurm/train.sbatch"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("launch_ds"))
    make_dataset(root, shards=4, per_shard=16, latent_shape=(4, 8, 8), text_dim=32)
    return root


def start(cmd, log_path, env=None):
    """Run cmd in its own session (so cleanup can SIGKILL exactly its process group)."""
    log = open(log_path, "wb")
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def finish(proc, timeout):
    """Exit code of proc; SIGKILL its group past the timeout (JAX ignores SIGTERM)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{proc.args[:3]} did not finish in {timeout} s")


def steps_saved(run_dir):
    ck = os.path.join(run_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ck) if d.isdigit())


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


@pytest.mark.slow
def test_local_launcher_sigterm_checkpoints_and_resumes(dataset, tmp_path):
    run = str(tmp_path / "run")
    local = [sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "2"]
    args = [f"--config.data.path={dataset}", f"--config.run_dir={run}"]
    log1 = tmp_path / "first.log"
    proc = start(
        [*local, "--", *TRAIN, *args, "--config.steps=100000", "--config.checkpoint.every=100000"],
        log1,
    )
    deadline = time.monotonic() + 120
    while "img_s=" not in read(log1) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, read(log1)[-3000:]
    proc.send_signal(signal.SIGTERM)  # the launcher passes it to both trainers
    assert finish(proc, 120) == 0, read(log1)[-3000:]
    assert "stop signal: checkpoint of step" in read(log1)
    [stopped] = steps_saved(run)
    assert 0 < stopped < 100000

    log2 = tmp_path / "second.log"
    more = [f"--config.steps={stopped + 2}", "--config.checkpoint.every=1"]
    proc = start([*local, "--", *TRAIN, *args, *more, "--config.checkpoint.keep=100"], log2)
    assert finish(proc, 150) == 0, read(log2)[-3000:]
    # resumed: only steps after the stop were added (a fresh start would save from step 1)
    assert steps_saved(run) == [stopped, stopped + 1, stopped + 2]
    assert os.path.isdir(os.path.join(run, "weights"))


def test_local_launcher_gives_each_process_its_devices():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    try:
        import local
    finally:
        sys.path.pop(0)
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_foo=1"}
    env = local.process_env(base, 1, 2, 1234, 2, [])
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=2"]
    gpu = local.process_env({}, 1, 2, 1234, 2, ["4", "5", "6", "7"])
    assert gpu["CUDA_VISIBLE_DEVICES"] == "6,7"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_launcher_trains_and_fans_out_encoding(dataset, tmp_path):
    pytest.importorskip("ray", reason="Ray is in the `launch` extra: pip install -e .[launch]")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # throwaway loopback cluster
    ray_cmd = [sys.executable, "launch/ray/launcher.py", "--address", "local", "--num-cpus", "4"]
    gang = ["--workers", "2", "--gpus-per-worker", "0", "--schedule-timeout", "60"]
    run = str(tmp_path / "run")
    log = tmp_path / "ray_train.log"
    train = [*gang, "--cpu-devices", "2", "--coordinator-port", str(free_port())]
    args = [f"--config.data.path={dataset}", f"--config.run_dir={run}"]
    proc = start([*ray_cmd, "train", *train, "--", *TRAIN, *args], log, env)
    assert finish(proc, 180) == 0, read(log)[-3000:]
    assert "coordinator 127.0.0.1:" in read(log)
    assert steps_saved(run) == [2, 4]
    assert os.path.isdir(os.path.join(run, "weights"))

    # encode fan-out: each actor gets its share flags (a stand-in for data_prep.encode)
    out = tmp_path / "shares"
    out.mkdir()
    record = (
        "import sys; a = sys.argv; i = a[a.index('--worker-index') + 1]; "
        "open(f'{a[1]}/{i}', 'w').write(' '.join(a[2:]))"
    )
    log = tmp_path / "ray_encode.log"
    cmd = [*ray_cmd, "encode", *gang, "--", sys.executable, "-c", record, str(out), "--x"]
    proc = start(cmd, log, env)
    assert finish(proc, 90) == 0, read(log)[-3000:]
    shares = {p.name: p.read_text() for p in out.iterdir()}
    assert shares == {str(i): f"--x --num-workers 2 --worker-index {i}" for i in range(2)}


def test_entrypoint_turns_a_clean_sigterm_stop_into_143(tmp_path):
    fake = tmp_path / "python"  # stands in for the trainer: checkpoint on SIGTERM, exit 0
    fake.write_text("#!/usr/bin/env bash\ntrap 'exit 0' TERM\necho ready\nsleep 30 & wait\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "AT1_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.Popen(
        ["bash", "launch/entrypoint.sh", "--config", "x"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, 20) == 143
    fake.write_text("#!/usr/bin/env bash\nexit 7\n")
    assert subprocess.run(["bash", "launch/entrypoint.sh"], cwd=ROOT, env=env).returncode == 7


def env_of(container):
    return {e["name"]: e for e in container["env"]}


def test_kubernetes_jobset_manifest():
    with open(os.path.join(ROOT, "launch/kubernetes/jobset.yaml")) as f:
        docs = {d["kind"]: d for d in yaml.safe_load_all(f)}
    assert {"ServiceAccount", "Role", "RoleBinding", "JobSet"} <= set(docs)
    js = docs["JobSet"]
    assert js["apiVersion"].startswith("jobset.x-k8s.io/")
    assert js["spec"]["network"]["enableDNSHostnames"] is True
    job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"]
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    [c] = pod["containers"]
    assert c["command"] == ["launch/entrypoint.sh"]
    assert os.access(os.path.join(ROOT, c["command"][0]), os.X_OK)
    assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert 55527 in [p["containerPort"] for p in c["ports"]]  # JAX's Kubernetes port
    env = env_of(c)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"]["key"] == key
        assert "value" not in env[key]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    rules = docs["Role"]["rules"]
    assert any("pods" in r["resources"] and "list" in r["verbs"] for r in rules)
    assert any("jobs" in r["resources"] for r in rules)


def test_akash_sdl():
    with open(os.path.join(ROOT, "launch/akash/deploy.yaml")) as f:
        sdl = yaml.safe_load(f)
    assert sdl["version"] == "2.0"
    services = sdl["services"]
    assert set(services) == {"ray-head", "ray-worker"}
    exposed = {name: {e["port"] for e in s["expose"]} for name, s in services.items()}
    assert {6379, 8265} <= exposed["ray-head"]  # Ray GCS, dashboard
    assert 8476 in exposed["ray-worker"]  # jax.distributed coordinator (the launcher default)
    assert {6380, 6381} <= exposed["ray-worker"]
    assert '--coordinator-port "$COORDINATOR_PORT"' in services["ray-head"]["args"][0]
    assert "COORDINATOR_PORT=8476" in services["ray-head"]["env"]
    for name, service in services.items():
        assert service["params"]["storage"]["shm"]["mount"] == "/dev/shm"
        env = dict(e.split("=", 1) for e in service["env"])
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):
            assert env[key] == "${" + key + "}", f"{name}: {key} must be a placeholder"
    compute = sdl["profiles"]["compute"]
    for profile in compute.values():
        shm = {s.get("name"): s for s in profile["resources"]["storage"]}["shm"]
        assert shm["attributes"] == {"persistent": False, "class": "ram"}
        # no persistent volumes are relied on: leases end, pods restart elsewhere
        for s in profile["resources"]["storage"]:
            assert not s.get("attributes", {}).get("persistent", False)
    gpu = compute["ray-worker"]["resources"]["gpu"]
    assert gpu["units"] >= 1
    assert "a100" in [m["model"] for m in gpu["attributes"]["vendor"]["nvidia"]]
    placement = next(iter(sdl["profiles"]["placement"]))
    for name in services:
        assert sdl["deployment"][name][placement]["profile"] in compute


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax(script):
    path = os.path.join(ROOT, script)
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", os.path.join(ROOT, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
