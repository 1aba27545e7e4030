"""The training entry point end to end: errors before compiling, exact resume, processes, S3."""

import asyncio
import dataclasses
import errno
import gc
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from at1_io.synthetic import make_dataset
from at1_jax.checkpointing import checkpoints as checkpoint
from at1_jax.train import config, data, plots, run_setup, sharding, validation
from at1_jax.train import step as train_step
from at1_jax.train import trainer as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
import dataclasses
from at1_jax.train.config import *
from at1_jax.model.objective import ObjectiveConfig
from at1_jax.model.presets import PRESETS

def get_config():
    return TrainConfig(
        name="test", run_dir={run_dir!r}, steps={steps}, seed=3,
        model=dataclasses.replace(PRESETS["tld-tiny"], latent_size=8, depth=2, text_dim=32),
        objective=ObjectiveConfig(cfg_drop=0.2),
        data=DataConfig(path={data!r}, batch_size=8, shuffle_shards=2, streams=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=3, clip_norm=1.0, ema_decay=0.9),
        mesh=MeshConfig(data=2, fsdp=2, min_fsdp_mib={min_fsdp_mib}),  # 0: split every weight
        checkpoint=CheckpointConfig(dir={ckpt!r}, every={every}, keep=3, async_save={async_save}),
        log=LogConfig(every=1, tensorboard={tb}, sample_every=0, val_every={val_every}),
    )
"""


def write_config(
    tmp_path,
    name,
    data,
    steps=6,
    every=3,
    ckpt="",
    async_save=True,
    tb=False,
    val_every=0,
    min_fsdp_mib=0.0,
):
    run_dir = str(tmp_path / name)
    text = CONFIG.format(
        min_fsdp_mib=min_fsdp_mib,
        run_dir=run_dir,
        steps=steps,
        data=data,
        ckpt=ckpt,
        every=every,
        async_save=async_save,
        tb=tb,
        val_every=val_every,
    )
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    # 4 training shards (cc0 and cc-by samples) and one held-out validation shard of 12.
    make_dataset(str(root), shards=4, per_shard=12, val_shards=1)
    return str(root)


def final_state(cfg_path, step=None):
    """(state, meta) of the latest (or given) checkpoint of a run, on 4 local devices."""
    cfg = config.load_file(cfg_path)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices=jax.devices()[:4])
    tx = train_step.make_optimizer(cfg.optim, cfg.steps)
    spec = train_step.state_spec(cfg, tx, mesh)
    ck = checkpoint.Checkpoints(cfg.checkpoint_dir, read_only=True)
    state, meta = ck.restore(step or ck.latest_step(), spec.abstract)
    ck.close()
    return jax.tree.map(np.asarray, state), meta


def assert_same_state(a, b, atol=0.0):
    for part in ("params", "ema", "opt", "step"):
        leaves_a, leaves_b = jax.tree.leaves(a[part]), jax.tree.leaves(b[part])
        assert len(leaves_a) == len(leaves_b)
        for x, y in zip(leaves_a, leaves_b, strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=part)


def run_cli(args, env=None, **kw):
    env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "at1_jax.train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL: JAX may ignore SIGTERM
        out, _ = proc.communicate()
        raise AssertionError(f"training did not finish:\n{out[-3000:]}") from None
    return proc.returncode, out


@pytest.fixture
def no_compile(monkeypatch):
    """Fail the test if anything reaches state initialisation or step compilation."""

    def boom(*a, **k):
        raise AssertionError("compiled before the config error was reported")

    monkeypatch.setattr(train_step, "init_state", boom)
    monkeypatch.setattr(train_step, "make_train_step", boom)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--config.data.path={missing}"], "manifest.json not found: is data.path a dataset"),
        (
            ["--config.model.latent_size=16"],
            "--config.model.latent_size=16 (data set: 8) given on the command line does not fit",
        ),
        (
            ["--config.model.text_dim=64", "--config.model.latent_channels=3"],
            "--config.model.latent_channels=3 (data set: 4), --config.model.text_dim=64 (data "
            "set: 32) given on the command line does not fit the data set",
        ),
        (["--config.model.latent_size=6"], "model.latent_size=6 (data set: 8)"),
        (["--config.optim.lr=inf"], "config.optim.lr must be a finite number, got inf"),
        (["--config.optim.clip_norm=nan"], "config.optim.clip_norm must be a finite number"),
        (["--config.log.wandb=true"], "config.log.wandb=true but wandb is not installed: pip"),
        (
            [
                "--config.distributed.coordinator=127.0.0.1:1",
                "--config.distributed.num_processes=2",
            ],
            "but no process id: set config.distributed.process_id or JAX_PROCESS_ID",
        ),
        (["--config.data.batch_size=6"], "must be a multiple of the data-parallel size 4"),
        (["--config.data.streams=8", "--config.data.batch_size=4"], "not divisible by the 8 read"),
        (["--config.data.streams=5", "--config.data.batch_size=20"], "4 shards for 5 reading"),
        (["--config.mesh.data=3"], "must equal the"),
        (["--config.optim.lr=-1"], "config.optim.lr must be > 0, got -1.0"),
        (["--config.optim.bogus=1"], "unknown field 'bogus'"),
    ],
)
def test_bad_configs_and_paths_fail_before_compiling(
    tmp_path, dataset, no_compile, capsys, monkeypatch, overrides, message
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, whatever this venv has
    cfg = write_config(tmp_path, "bad", dataset)
    args = [o.format(missing=str(tmp_path / "none")) for o in overrides]
    assert train.main(["--config", cfg, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_model_sizes_come_from_the_data_set_unless_pinned(tmp_path):
    make_dataset(str(tmp_path / "ds"), shards=1, per_shard=2, latent_shape=(3, 12, 12), text_dim=24)
    ds = data.open_dataset(str(tmp_path / "ds"))
    cfg = config.load_file(write_config(tmp_path, "sizes", str(tmp_path / "ds")))  # 4×8×8, 32
    fitted = run_setup.fit_to_dataset(cfg, ds)
    m = fitted.model
    assert (m.latent_channels, m.latent_size, m.text_dim) == (3, 12, 24)
    assert fitted.model.architecture() == dataclasses.replace(
        cfg.model.architecture(), latent_channels=3, latent_size=12, text_dim=24
    )
    pinned = run_setup.pinned_sizes(["--config.model.latent-size=12", "--config.model.depth=1"])
    assert pinned == {"latent_size"}
    # A pin that agrees is fine; a preset swapped in after a pin replaces it.
    assert run_setup.fit_to_dataset(dataclasses.replace(cfg, model=m), ds, pinned).model == m
    assert run_setup.pinned_sizes(["--config.model.text_dim=3", "--config.model=at1"]) == set()
    with pytest.raises(config.ConfigError, match=r"model.text_dim=32 \(data set: 24\)"):
        run_setup.fit_to_dataset(cfg, ds, frozenset({"text_dim"}))
    odd = str(tmp_path / "odd")
    make_dataset(odd, shards=1, per_shard=2, latent_shape=(4, 7, 7), text_dim=24)
    with pytest.raises(config.ConfigError, match=r"latents \(4, 7, 7\).*not a multiple of"):
        run_setup.fit_to_dataset(cfg, data.open_dataset(odd))


@pytest.mark.slow
def test_non_finite_loss_stops_without_a_checkpoint(tmp_path, capsys):
    make_dataset(str(tmp_path / "ds"), shards=2, per_shard=8)
    # Poison every latent of one shard: the first batches that touch it go non-finite.
    import io

    from at1_io import schema

    manifest = schema.load_manifest((tmp_path / "ds" / "manifest.json").read_text())
    samples = []
    for shard in manifest.shards:
        data = (tmp_path / "ds" / shard.path).read_bytes()
        samples += list(schema.iter_shard_samples(data, shard.name))
    for s in samples:
        s["latent_mean"] = np.full_like(s["latent_mean"], np.inf)
    for i, shard in enumerate(manifest.shards):
        buf = io.BytesIO()
        schema.write_shard(buf, samples[i * 8 : (i + 1) * 8])
        (tmp_path / "ds" / shard.path).write_bytes(buf.getvalue())
        manifest.shards[i] = type(shard)(
            shard.name, shard.path, 8, schema.sha256_bytes(buf.getvalue()), len(buf.getvalue())
        )
    (tmp_path / "ds" / "manifest.json").write_text(schema.dump_manifest(manifest))
    cfg = write_config(tmp_path, "nan", str(tmp_path / "ds"), steps=4, every=1)
    assert train.main(["--config", cfg]) == train.EXIT_NONFINITE
    out = capsys.readouterr()
    assert "non-finite loss or gradient at step 1" in out.out + out.err
    assert not os.path.exists(tmp_path / "nan" / "checkpoints") or not os.listdir(
        tmp_path / "nan" / "checkpoints"
    )


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the point of the test
@pytest.mark.slow
def test_update_that_overflows_the_weights_stops_before_any_checkpoint(tmp_path, dataset, capsys):
    # lr=1e39 is finite for the config (a Python float) and inf in the float32 update: the
    # first step's loss and gradient are finite, the weights it would produce are not.
    cfg = write_config(tmp_path, "overflow", dataset, steps=1, every=1)
    args = ["--config", cfg, "--config.optim.lr=1e39", "--config.optim.warmup_steps=0"]
    assert train.main(args) == train.EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "the update of step 1 made the weights or optimizer state non-finite" in err
    assert "latest checkpoint: none yet" in err
    run = tmp_path / "overflow"
    assert not os.listdir(run / "checkpoints") and not (run / "weights").exists()


@pytest.mark.slow
def test_reruns_never_change_a_run_silently(tmp_path, dataset, capsys, monkeypatch):
    cfg = write_config(tmp_path, "r", dataset, steps=2, every=1)
    assert train.main(["--config", cfg]) == 0
    run = tmp_path / "r"
    record = (run / "config.json").read_bytes()
    exported = (run / "weights" / "params.safetensors").read_bytes()
    capsys.readouterr()

    def boom(*a, **k):
        raise AssertionError("a rerun that cannot train compiled a step")

    monkeypatch.setattr(train_step, "make_train_step", boom)
    ck = str(run / "checkpoints")
    refused = [
        # Another architecture: what differs and what to do, not orbax's tree dump.
        (["--config.model.depth=3", "--config.steps=4"], f"cannot resume from step 2 in {ck}"),
        (["--config.model.depth=3", "--config.steps=4"], "model.depth 2 -> 3"),
        (["--config.optim.clip_norm=0", "--config.steps=4"], "optim.clip_norm 1.0 -> 0.0"),
        # A finished run with changed settings trains nothing and says so.
        (["--config.optim.lr=1e-4"], f"{ck} already holds step 2 and config.steps=2"),
        (["--config.optim.lr=1e-4"], "optim.lr 0.001 -> 0.0001"),
        (["--config.steps=1"], "steps 2 -> 1"),
        # Starting over on top of a run's checkpoints would collide with them at its first save.
        (["--no-resume"], f"{ck} already holds the checkpoints of a run (steps [1, 2])"),
    ]
    for args, message in refused:
        assert train.main(["--config", cfg, *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "new run_dir" in err and "partial_restore" not in err, err
    # The same command again: nothing to do, nothing rewritten.
    assert train.main(["--config", cfg]) == 0
    assert "already finished at step 2: nothing to do" in capsys.readouterr().out
    # Weights lost (e.g. the export failed): the rerun exports them from the checkpoint.
    for name in os.listdir(run / "weights"):
        os.remove(run / "weights" / name)
    os.rmdir(run / "weights")
    assert train.main(["--config", cfg]) == 0
    assert "already finished at step 2; its EMA weights were exported" in capsys.readouterr().out
    assert (run / "weights" / "params.safetensors").read_bytes() == exported
    assert json.loads((run / "weights" / "dataset.json").read_text())["step"] == 2
    assert (run / "config.json").read_bytes() == record
    assert checkpoint.Checkpoints(ck, read_only=True).steps() == [1, 2]


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupt_latest_step(tmp_path, dataset, capsys, caplog):
    cfg = write_config(tmp_path, "fallback", dataset, steps=3, every=1, async_save=False)
    assert train.main(["--config", cfg]) == 0
    ck = tmp_path / "fallback" / "checkpoints"
    # 64 flipped bytes inside step 3's array data: TensorStore reads them back without an
    # error; the checksums written at save catch them.
    data_file = max((ck / "3" / "state").glob("ocdbt.process_0/d/*"), key=os.path.getsize)
    blob = bytearray(data_file.read_bytes())
    at = len(blob) * 3 // 8
    blob[at : at + 64] = bytes(b ^ 0xFF for b in blob[at : at + 64])
    data_file.write_bytes(bytes(blob))
    capsys.readouterr()
    assert train.main(["--config", cfg, "--config.steps=4"]) == 0
    out = capsys.readouterr().out
    assert (
        "resuming from step 2 of 4" in out and "settings changed since step 2: steps 3 -> 4" in out
    )
    assert "checkpoint step 3 of" in caplog.text and "is corrupt" in caplog.text
    state, meta = final_state(cfg)
    assert meta["step"] == 4 and int(state["step"]) == 4
    assert checkpoint.Checkpoints(str(ck), read_only=True).steps() == [2, 3, 4]


@pytest.mark.slow
def test_disk_full_at_export_is_one_error_line_and_a_rerun_exports(
    tmp_path, dataset, capsys, caplog, monkeypatch
):
    from at1_jax.model import weights
    from at1_jax.train import reporting

    def full(directory, *a, **k):
        os.makedirs(directory, exist_ok=True)
        open(os.path.join(directory, "params.safetensors.tmp"), "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", directory)

    close = reporting.Reporter.close

    def flush_fails(self):  # the bar closes, then TensorBoard's flush meets the full disk
        close(self)
        raise OSError(errno.ENOSPC, "No space left on device", "events.out.tfevents")

    monkeypatch.setattr(weights, "save", full)
    monkeypatch.setattr(reporting.Reporter, "close", flush_fails)
    cfg = write_config(tmp_path, "full", dataset, steps=2, every=2)
    assert train.main(["--config", cfg]) == train.EXIT_FAILED
    err = capsys.readouterr().err
    run = tmp_path / "full"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"writing the EMA weights of step 2 to {run}/weights failed" in errors[0]
    assert "No space left on device" in errors[0] and "rerun the same command" in errors[0]
    # Reported as a warning, not masking the error.
    assert "closing the logs also failed while stopping: OSError" in caplog.text
    # No partial weights (the logs and curves of the two steps are there).
    assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "curves.png", "scalars.jsonl"]
    monkeypatch.undo()  # space freed
    assert train.main(["--config", cfg]) == 0
    assert "its EMA weights were exported" in capsys.readouterr().out
    assert json.loads((run / "weights" / "dataset.json").read_text())["step"] == 2


@pytest.mark.slow
def test_resume_continues_and_init_from_loads_weights(tmp_path, dataset):
    cfg = write_config(tmp_path, "a", dataset, steps=4, every=2)
    assert train.main(["--config", cfg]) == 0
    state4, meta = final_state(cfg)
    assert meta["step"] == 4 and int(state4["step"]) == 4
    assert len(meta["data_positions"]) == 2  # one per reading stream
    saved = json.loads(open(tmp_path / "a" / "config.json").read())
    assert saved["steps"] == 4 and "AWS" not in json.dumps(saved)
    # Longer run, same folder: resumes from step 4 instead of starting over.
    assert train.main(["--config", cfg, "--config.steps=6"]) == 0
    _, meta6 = final_state(cfg)
    assert meta6["step"] == 6
    # Fine-tune from the exported EMA weights of the first run.
    weights_dir = str(tmp_path / "a" / "weights")
    ft = write_config(tmp_path, "ft", dataset, steps=1, every=1)
    cfg_ft = config.apply_overrides(
        config.load_file(ft), [f"--config.checkpoint.init_from={weights_dir}"]
    )
    model = run_setup.initial_model(cfg_ft)
    from at1_jax.model import weights

    stored = weights.model_arrays(weights.load(weights_dir))
    assert weights.model_arrays(model).keys() == stored.keys()
    for k, v in weights.model_arrays(model).items():
        np.testing.assert_array_equal(v, stored[k])
    # The sample CLI loads a run folder (latest checkpoint's EMA) and the exported weights.
    from at1_jax.checkpointing.load import load_model

    run_model, run_info = load_model(str(tmp_path / "a"))
    assert run_info["source"] == "checkpoint" and run_info["step"] == 6
    ema6 = final_state(cfg)[0]["ema"]
    got = nnx.to_pure_dict(nnx.state(run_model, nnx.Param))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ema6), strict=True):
        np.testing.assert_array_equal(x, y)
    # A fresh one-device process (what the sample CLI is) restores the 4-device checkpoint.
    code = (
        "from at1_jax.checkpointing.load import load_model; import sys; "
        "m, info = load_model(sys.argv[1]); print('step', info['step'], m.cfg.depth)"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "a")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "step 6 2" in out.stdout, out.stderr[-2000:]
    _, info = load_model(weights_dir)
    assert info["text_encoder"] == "clip=tiny" and info["latent_scale"] == 8.0
    assert run_info["text_encoder"] == "clip=tiny" and run_info["latent_scale"] == 8.0
    # init_from also takes a run folder (its latest EMA), and names a bad path.
    from_run = run_setup.initial_model(
        config.apply_overrides(cfg_ft, [f"--config.checkpoint.init_from={tmp_path / 'a'}"])
    )
    got = nnx.to_pure_dict(nnx.state(from_run, nnx.Param))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ema6), strict=True):
        np.testing.assert_array_equal(x, y)
    missing = config.apply_overrides(cfg_ft, [f"--config.checkpoint.init_from={tmp_path}/nope"])
    with pytest.raises(
        config.ConfigError, match=r"config.checkpoint.init_from: .*nope.* not found"
    ):
        run_setup.initial_model(missing)
    # Step 6's metadata no longer matches its checksum: the model and the facts reported
    # (step, card) are step 4's, the newest intact one.
    from at1_jax.checkpointing.load import MissingFiles

    def corrupt_meta(step):
        f = tmp_path / "a" / "checkpoints" / str(step) / "meta" / "metadata"
        meta = json.loads(f.read_text())
        meta["step"] += 100  # still valid JSON: only the checksum can tell
        f.write_text(json.dumps(meta))

    corrupt_meta(6)
    run_model, run_info = load_model(str(tmp_path / "a"))
    assert run_info["step"] == 4 and "4 steps" in run_info["summary"], run_info
    got = nnx.to_pure_dict(nnx.state(run_model, nnx.Param))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(state4["ema"]), strict=True):
        np.testing.assert_array_equal(x, y)
    corrupt_meta(4)
    corrupt_meta(2)
    with pytest.raises(MissingFiles, match=r"cannot load checkpoint .*: no intact checkpoint"):
        load_model(str(tmp_path / "a"))


@pytest.mark.slow
def test_cpu_quick_start_runs_verbatim_on_one_device(tmp_path, dataset):
    # docs/training.md's command; steps and run_dir only keep the test short and in tmp_path.
    quick = [
        "--config",
        "configs/cpu.py",
        f"--config.data.path={dataset}",
        "--config.optim.lr=1e-4",
    ]
    run = tmp_path / "cpu"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    code, out = finish(run_cli([*quick, "--config.steps=2", f"--config.run_dir={run}"], env))
    assert code == 0, out[-3000:]
    # configs/cpu.py names the tld-tiny sizes (4×16×16 latents, 768-d text); the data set's
    # manifest (4×8×8, 32-d) decides.
    assert "latent_size=8 (config: 16), text_dim=32 (config: 768)" in out
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["latent_channels"], model["latent_size"], model["text_dim"]) == (4, 8, 32)
    # configs/cpu.py computes in dtype "auto": the run records what that meant here.
    from at1_jax.model.hardware import auto_dtype_reason

    dtype, why = auto_dtype_reason()
    assert model["dtype"] == dtype and f"model.dtype auto: {dtype} ({why})" in out
    assert (run / "weights" / "params.safetensors").exists()


@pytest.mark.slow
def test_failed_async_save_is_reported_under_its_own_step(tmp_path, dataset):
    # A 1 MB file-size limit: step 1's checkpoint (~10 MB of arrays) fails in orbax's
    # background writer, which the next save (step 2) is the first to hear about.
    cfg = write_config(tmp_path, "async", dataset, steps=3, every=1, async_save=True)
    # bash sets the limit (in KiB) before exec: no Python runs between fork and exec in this
    # multithreaded test process. Python ignores SIGXFSZ, so writes fail with EFBIG.
    limited = ["bash", "-c", 'ulimit -f 1024 && exec "$@"', "bash", sys.executable]
    proc = subprocess.Popen(
        [*limited, "-m", "at1_jax.train", "--config", cfg],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    code, out = finish(proc)
    assert code == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: saving step 1 to {tmp_path / 'async' / 'checkpoints'} failed"
    ), out[-3000:]
    assert "File too large" in errors[0] and "Traceback" not in out


def test_unreachable_checkpoint_storage_fails_after_its_retry_budget(tmp_path, dataset):
    # Nothing listens on the endpoint: every S3 request is a connection error, retried for
    # checkpoint.retry_seconds (2 s here, 120 s by default), then the run stops with exit 1
    # (an outside failure: rerun once storage is back), before compiling anything.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = "s3://no-server/ckpt"
    cfg = write_config(tmp_path, "s3down", dataset, ckpt=url)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    t0 = time.monotonic()
    code, out = finish(run_cli(["--config", cfg, "--config.checkpoint.retry_seconds=2"], env))
    took = time.monotonic() - t0
    assert code == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and url in errors[0] and f"127.0.0.1:{port}" in errors[0], out
    assert re.search(r"retry 1 of \d+ in [\d.]+ s, giving up 2 s after", out), out[-3000:]
    assert "compiling" not in out and "Traceback" not in out
    assert took < 60, took  # the default budget alone would take over 120 s


def test_tasks_left_failing_at_asyncio_shutdown_log_without_traceback(caplog):
    # What a failed async save can leave behind (seen in CI): orbax write tasks that fail
    # while asyncio.run() shuts down, which asyncio logs with their tracebacks.
    train.quiet_library_tracebacks()

    async def write_fails():
        raise ValueError("Failed to write: File too large")

    left: list[asyncio.Future] = []

    async def save():
        left.append(asyncio.ensure_future(write_fails()))
        await asyncio.sleep(0)
        raise RuntimeError("save failed")

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(RuntimeError):
            asyncio.run(save())
        left.clear()
        gc.collect()  # asyncio logs a failed task nobody awaited when it is collected
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert records and all(r.exc_info is None and r.exc_text is None for r in records)
    assert "Traceback" not in caplog.text


@pytest.mark.slow
def test_sigterm_during_compile_stops_cleanly(tmp_path, dataset):
    cfg = write_config(tmp_path, "early", dataset, steps=1000, every=1000)
    proc = run_cli(["--config", cfg])
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while not any("compiling the train step" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no compile line:\n" + "".join(lines)[-3000:])
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # XLA is compiling; Python sees it when that returns
    try:
        code = proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL: the signal did not stop it
        raise
    reader.join()
    out = "".join(lines)
    assert code == 0, out[-3000:]
    assert "stop signal before the first step: nothing to save (no checkpoint), exiting" in out
    assert not os.listdir(tmp_path / "early" / "checkpoints")


def test_unreachable_s3_while_reading_shards_is_one_error_line(
    tmp_path, dataset, s3_env, request, monkeypatch, capsys
):
    client = s3_env.client()
    for folder, _, files in os.walk(dataset):
        for name in files:
            path = os.path.join(folder, name)
            key = f"{request.node.name}/{os.path.relpath(path, dataset)}"
            client.upload_file(path, s3_env.bucket, key)
    opened = data.open_dataset

    def manifest_then_outage(*args, **kw):
        ds = opened(*args, **kw)
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
        return ds

    monkeypatch.setattr(data, "open_dataset", manifest_then_outage)
    cfg = write_config(tmp_path, "s3down", s3_env.url(request.node.name), steps=2)
    assert train.main(["--config", cfg]) == train.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"error: cannot read shard {s3_env.url(request.node.name)}/shards/" in err
    assert "EndpointConnectionError" in err and "No shard was skipped" in err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_and_sigterm_runs_resume_to_the_uninterrupted_state(tmp_path, dataset):
    steps = 40
    ref_cfg = write_config(tmp_path, "ref", dataset, steps=steps, every=4, async_save=False)
    code, out = finish(run_cli(["--config", ref_cfg]))
    assert code == 0, out[-3000:]
    reference, ref_meta = final_state(ref_cfg)
    assert sum(ref_meta["consumed"]["licenses"].values()) == steps * 8
    rng = random.Random(0)
    for name, sig in (("killed", signal.SIGKILL), ("termed", signal.SIGTERM)):
        cfg = write_config(tmp_path, name, dataset, steps=steps, every=4, async_save=False)
        proc = run_cli(["--config", cfg])
        ckdir = tmp_path / name / "checkpoints"
        deadline = time.monotonic() + 240
        while not (ckdir.exists() and any(p.isdigit() for p in os.listdir(ckdir))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][
                -3000:
            ]
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))  # a random step after the first checkpoint
        proc.send_signal(sig)
        code, out = finish(proc)
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 0 and "stop signal: checkpoint of step" in out, out[-3000:]
        stopped_at = max(int(p) for p in os.listdir(ckdir) if p.isdigit())
        assert stopped_at < steps, f"{name}: the run ended before the signal"
        code, out = finish(run_cli(["--config", cfg]))
        assert code == 0, out[-3000:]
        resumed, meta = final_state(cfg)
        assert meta["step"] == steps
        # Same program, same data, same keys: bit-for-bit.
        assert_same_state(resumed, reference)
        # What was trained on is counted once, the steps redone after the kill included.
        assert meta["consumed"] == ref_meta["consumed"], name
        assert meta["consumed"]["samples"] == steps * 8
        # The rows logged after the resumed checkpoint were dropped and logged again: one each.
        logged = [r["step"] for r in plots.read_scalars(str(tmp_path / name))]
        assert logged == list(range(1, steps + 1)), name


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "min_fsdp_mib, flat_across_processes",
    [(0.0, False), (4.0, True)],  # every weight split over fsdp; every weight whole
)
def test_two_processes_match_one_process(tmp_path, dataset, min_fsdp_mib, flat_across_processes):
    run = dict(steps=5, every=5, val_every=1, min_fsdp_mib=min_fsdp_mib)
    one = write_config(tmp_path, "one", dataset, **run)
    code, out = finish(run_cli(["--config", one]))
    assert code == 0, out[-3000:]
    two = write_config(tmp_path, "two", dataset, **run)
    launcher = subprocess.Popen(
        [sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "2", "--",
         sys.executable, "-m", "at1_jax.train", "--config", two],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    code, out_two = finish(launcher)
    assert code == 0, out_two[-3000:]
    # Whole weights across processes (gloo): the gradients summed as one flat buffer
    # (shard_map); in one process, and with split weights, where XLA places the all-reduces.
    flat = "gradients: one flat all-reduce per step (mesh.grad_reduce=auto)"
    assert (flat in out_two) == flat_across_processes and flat not in out
    a, meta_a = final_state(one)
    b, meta_b = final_state(two)
    assert meta_a["data_positions"] == meta_b["data_positions"]
    # Each process counts its own streams; the saved counts are their sum.
    assert meta_a["consumed"] == meta_b["consumed"] and meta_a["consumed"]["samples"] == 40
    val_a = [r for r in plots.read_scalars(str(tmp_path / "one")) if "val_loss" in r]
    val_b = [r for r in plots.read_scalars(str(tmp_path / "two")) if "val_loss" in r]
    assert [r["step"] for r in val_a] == [r["step"] for r in val_b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(val_a, val_b, strict=True):
        # Step 1 ran at learning rate 0 (warm-up): the same weights in both runs, so only
        # the cross-process collectives' float32 reassociation could differ (seen: none).
        # Later steps add the training's weight differences (< 1e-5, asserted below; seen
        # here: losses within 1.4e-7 relative).
        rel = 1e-6 if ra["step"] == 1 else 1e-5
        for k in (k for k in ra if k.startswith("val_loss")):
            assert rb[k] == pytest.approx(ra[k], rel=rel), (ra["step"], k)
    # Same batches and keys; gradients are all-reduced across processes (gloo) in another
    # order than within one: fp32 reassociation, ~1e-7 per step, a few steps of Adam.
    assert_same_state(a, b, atol=1e-5)


@pytest.mark.slow
def test_s3_data_and_checkpoints_save_list_and_resume(tmp_path, dataset, s3_env, request):
    # Shards streamed from S3 too: upload the dataset folder as it is.
    client = s3_env.client()
    for folder, _, files in os.walk(dataset):
        for name in files:
            path = os.path.join(folder, name)
            key = f"{request.node.name}/data/{os.path.relpath(path, dataset)}"
            client.upload_file(path, s3_env.bucket, key)
    s3_data = s3_env.url(f"{request.node.name}/data")
    url = s3_env.url(f"{request.node.name}/ckpt")
    cfg = write_config(tmp_path, "s3", s3_data, steps=4, every=2, ckpt=url)
    assert train.main(["--config", cfg]) == 0
    ck = checkpoint.Checkpoints(url, read_only=True)
    assert ck.steps() == [2, 4]
    ck.close()
    assert train.main(["--config", cfg, "--config.steps=6"]) == 0
    state, meta = final_state(cfg)
    assert meta["step"] == 6 and int(state["step"]) == 6
    # The whole run on local disk gives the same weights: S3 changes where, not what.
    local = write_config(tmp_path, "local", dataset, steps=6, every=2)
    assert train.main(["--config", local]) == 0
    assert_same_state(state, final_state(local)[0])


@pytest.mark.slow
def test_dry_run_help_progress_messages_and_labelled_sample_sheets(tmp_path, dataset, capsys):
    cfg = write_config(tmp_path, "ux", dataset, steps=2, every=2)
    assert train.main(["--config", cfg, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[: out.index("\ndata set")])["steps"] == 2  # the resolved config
    assert "48 training samples in 4 shards, 12 held out" in out and "parameters; 2 steps" in out
    assert not (tmp_path / "ux").exists()  # nothing written, nothing compiled
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert "Model presets (--config.model=NAME): tld-tiny, at1" in capsys.readouterr().out
    grids = ["--config.log.sample_every=2", "--config.log.num_samples=3"]
    assert train.main(["--config", cfg, *grids]) == 0
    out = capsys.readouterr().out
    assert "compiling the train step (" in out and "resuming" not in out
    sheet = np.asarray(Image.open(tmp_path / "ux" / "samples" / "step_00000002.png"))
    assert sheet.shape[1] == 8 + 2 * (128 + 8)  # 3 pixel grids 8x8 → 128-px cells, 2 columns
    assert (sheet[5:25].min(axis=-1) < 100).any()  # the title line is drawn
    more = write_config(tmp_path, "ux", dataset, steps=3, every=2)
    assert train.main(["--config", more]) == 0
    assert "resuming from step 2 of 3" in capsys.readouterr().out


def tensorboard_tags(run_dir) -> set[str]:
    """Scalar tags in a run's TensorBoard event files (TFRecord framing, tensorboardX protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    folder = os.path.join(run_dir, "tensorboard")
    for name in os.listdir(folder):
        blob = open(os.path.join(folder, name), "rb").read()
        at = 0
        while at < len(blob):
            (length,) = struct.unpack("<Q", blob[at : at + 8])
            event = event_pb2.Event.FromString(blob[at + 12 : at + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            at += 12 + length + 4  # length, its crc, the record, its crc
    return tags


@pytest.mark.slow
def test_validation_loss_is_logged_everywhere_and_evaluate_reproduces_it(tmp_path, dataset, capsys):
    from at1_jax.evaluate import cli as evaluate

    cfg = write_config(tmp_path, "val", dataset, steps=4, every=2, val_every=2, tb=True)
    assert train.main(["--config", cfg]) == 0
    printed = capsys.readouterr()
    run = tmp_path / "val"
    rows = plots.read_scalars(str(run))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one row per logged step
    names = validation.bin_names(5)
    keys = {f"val_loss{w}{b}" for w in ("", "_ema") for b in ["", *(f"_{n}" for n in names)]}
    for r in rows:
        assert {"loss", "lr", "grad_norm"} <= set(r)
        assert (keys <= set(r)) == (r["step"] in (2, 4)), r  # validation every 2 steps
    last = rows[-1]
    for w in ("", "_ema"):
        bins = [last[f"val_loss{w}_{n}"] for n in names]
        assert last[f"val_loss{w}"] == pytest.approx(np.mean(bins), rel=1e-12)
    assert rows[1]["val_loss_ema"] != last["val_loss_ema"]  # the weights moved
    assert f"val_loss_ema={last['val_loss_ema']:.4f}" in printed.err  # the progress bar
    assert {"val/loss", "val/loss_ema", f"val/loss_ema_{names[0]}", "train/loss"} <= (
        tensorboard_tags(run)
    )
    assert (run / plots.PLOT_FILE).is_file()  # curves.png, drawn at each checkpoint
    _, meta = final_state(cfg)
    assert meta["validation"] == {
        "step": 4,
        "set": {"root": dataset, "split": "val", "samples": 12},
        "bins": names,
        **{k: last[k] for k in keys},
    }
    card = json.loads((run / "weights" / "model_card.json").read_text())
    assert card["validation"] == meta["validation"]
    # The same number after the fact, from the exported EMA weights, on a 4×1 mesh with
    # replicated weights instead of 2×2 FSDP: float32 reassociation only.
    argv = ["--checkpoint", str(run / "weights"), "--val-loss", dataset, "--out", str(tmp_path)]
    assert evaluate.main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())["validation_loss"]
    assert report["val_loss"] == pytest.approx(last["val_loss_ema"], rel=1e-6)
    assert f"model: {card['summary']}" in capsys.readouterr().out


def test_licences_outside_the_allowed_set_are_refused_before_compiling(
    tmp_path, no_compile, capsys
):
    make_dataset(str(tmp_path / "nc"), shards=2, per_shard=4, licenses=("cc0", "cc-by-nc"))
    cfg = write_config(tmp_path, "nc", str(tmp_path / "nc"))
    assert train.main(["--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "the training split holds licences that config.data.licenses=" in err
    assert "does not allow: cc-by-nc (4 samples)" in err and "Traceback" not in err
    assert "--config.data.licenses=cc-by,cc-by-nc,cc-by-sa,cc0,pdm" in err


@pytest.mark.slow
def test_old_data_sets_train_only_when_unknown_licences_are_allowed(tmp_path, capsys):
    from test_data import strip_provenance

    root = str(tmp_path / "old")
    make_dataset(root, shards=2, per_shard=8)
    strip_provenance(root)  # no licences, sources or split totals, as before they existed
    cfg = write_config(tmp_path, "old", root, steps=2, every=2)
    assert train.main(["--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "does not allow: unknown (16 samples)" in err and "includes unknown" in err
    assert train.main(["--config", cfg, "--config.data.licenses=cc0,unknown"]) == 0
    _, meta = final_state(cfg)
    unknown = {"samples": 16, "licenses": {"unknown": 16}, "sources": {"unknown": 16}}
    assert meta["consumed"] == unknown
    card = json.loads((tmp_path / "old" / "weights" / "model_card.json").read_text())
    assert card["licenses"]["consumed"] == {"unknown": 16}
    assert "their terms are not known" in card["licenses"]["statement"]
    assert card["licenses"]["allowed"] == ["cc0", "unknown"] and card["validation"] is None


@pytest.mark.slow
@pytest.mark.timeout(600)  # two training runs
def test_consumed_licences_are_exact_across_a_resume_and_go_into_the_card(tmp_path, capsys):
    from at1_io import schema

    root = str(tmp_path / "lic")
    make_dataset(root, shards=4, per_shard=12, licenses=("cc0", "cc-by", "pdm"))
    cfg = write_config(tmp_path, "prov", root, steps=3, every=3)
    assert train.main(["--config", cfg]) == 0
    _, meta3 = final_state(cfg)
    assert meta3["consumed"]["samples"] == 24 and sum(meta3["consumed"]["licenses"].values()) == 24
    assert train.main(["--config", cfg, "--config.steps=6"]) == 0
    _, meta6 = final_state(cfg)
    manifest = schema.load_manifest((tmp_path / "lic" / "manifest.json").read_text())
    # 6 steps of 8 = 48 samples = one epoch of both streams: every training sample once.
    assert meta6["consumed"] == {
        "samples": 48,
        "licenses": manifest.totals(schema.TRAIN).licenses,
        "sources": {"synthetic": 48},
    }
    assert "trained on 48 samples: licences cc-by 16, cc0 16, pdm 16" in capsys.readouterr().out
    card = json.loads((tmp_path / "prov" / "weights" / "model_card.json").read_text())
    assert card["training"]["samples_seen"] == 48 and card["training"]["steps"] == 6
    assert card["data"][0]["consumed"] == meta6["consumed"]
    assert card["data"][0]["licenses"] == manifest.totals(schema.TRAIN).licenses


@pytest.mark.slow
@pytest.mark.timeout(600)  # two training runs
def test_a_fine_tune_names_its_parent_in_its_card(tmp_path, dataset):
    base = write_config(tmp_path, "base", dataset, steps=1, every=1)
    assert train.main(["--config", base]) == 0
    parent_dir = str(tmp_path / "base" / "weights")
    parent = json.loads(open(os.path.join(parent_dir, "model_card.json")).read())
    ft = write_config(tmp_path, "ft", dataset, steps=1, every=1)
    assert train.main(["--config", ft, "--init-from", parent_dir]) == 0
    card = json.loads((tmp_path / "ft" / "weights" / "model_card.json").read_text())
    assert card["parent"] == {"path": parent_dir, "summary": parent["summary"], "card": parent}
    assert f"Fine-tuned from {parent_dir}: its card says: " in card["licenses"]["statement"]
    assert card["summary"].endswith(f"fine-tuned from {parent_dir}")
