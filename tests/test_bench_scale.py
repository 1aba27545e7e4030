"""tools/bench_scale.py and `bench train` across processes: figures printed, never asserted."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "bench_scale.py"
LAUNCH = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2"]


def run(cmd, timeout):
    """(exit code, stdout, stderr); past the timeout its whole process group is SIGKILLed."""
    # A session of its own: the 1x4 bench child has no parent-death signal, so killing only
    # the tool would leave it running.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{cmd[1:3]} did not finish in {timeout} s")
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_scale_comparison_prints_both_configurations_ratio_and_verdict():
    # Batch 32 and 4 steps a window: ~0.2 s timed (over a few ms, getrusage read 2.11 cores'
    # CPU on 2 cores). A window that does not come stops the tool within --timeout-s.
    args = ["--presets", "tld-tiny", "--batch", "32", "--steps", "4", "--rounds", "2"]
    code, out, err = run([sys.executable, str(TOOL), *args, "--timeout-s", "240"], timeout=540)
    assert code == 0, (out + err)[-3000:]
    assert "preset=tld-tiny batch=32 dtype=auto steps=4 rounds=2 mesh=data:2,fsdp:2" in out
    # The two runs take turns, the order flipping every round.
    turns = re.findall(r"^tld-tiny round (\d)/2: (1x4|2x2) step [\d.]+ s$", out, re.M)
    assert turns == [("1", "1x4"), ("1", "2x2"), ("2", "2x2"), ("2", "1x4")], out
    rows = {
        m["name"]: m
        for m in re.finditer(
            r"^  (?P<name>1x4|2x2) +(?P<procs>\d+) +(?P<devs>\d+) +(?P<lo>[\d.]+) +"
            r"(?P<med>[\d.]+) +(?P<ips>[\d.]+) +(?P<cpu>[\d.]+) +(?P<cores>[\d.]+) "
            r"(?P<grads>flat|xla)$",
            out,
            re.M,
        )
    }
    assert set(rows) == {"1x4", "2x2"}, out
    assert (rows["1x4"]["procs"], rows["2x2"]["procs"]) == ("1", "2")
    assert rows["1x4"]["devs"] == rows["2x2"]["devs"] == "4"
    # tld-tiny's weights stay whole: one flat all-reduce across processes, XLA's in one.
    assert (rows["1x4"]["grads"], rows["2x2"]["grads"]) == ("xla", "flat")
    for row in rows.values():
        assert 0 < float(row["lo"]) <= float(row["med"]) and float(row["ips"]) > 0
        # All processes' CPU over the step: more than none, at most this machine's cores.
        assert 0 < float(row["cores"]) <= os.cpu_count() + 0.05
        # cores = CPU / median step, up to the printed digits
        cores_x_step = float(row["cores"]) * float(row["med"])
        assert float(row["cpu"]) == pytest.approx(cores_x_step, rel=0.01, abs=0.003)
    ratio = re.search(r"^  ratio 2x2/1x4 step time: ([\d.]+)x", out, re.M)
    assert ratio and float(ratio[1]) > 0, out
    assert re.search(r"^  within 10%: (yes|no)$", out, re.M), out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_train_benchmark_across_two_processes_reports_once():
    bench = [sys.executable, "-m", "at1_jax.bench", "train", "--preset", "tld-tiny"]
    bench += ["--batch", "4", "--steps", "1", "--data", "2", "--fsdp", "2"]
    code, out, err = run([*LAUNCH, "--devices-per-process", "2", "--", *bench], timeout=240)
    assert code == 0, (out + err)[-3000:]
    figures = [line for line in out.splitlines() if "images/s" in line]
    assert len(figures) == 1 and figures[0].startswith("[p0] "), out
    cpu = sorted(line[:5] for line in out.splitlines() if "this process: CPU" in line)
    assert cpu == ["[p0] ", "[p1] "], out  # each process's CPU time, for the run's total
    assert "[p0] backend=cpu device=cpu x4 processes=2 devices=4" in out, out
    assert "mesh=data:2,fsdp:2,tensor:1 accum=1 grad_reduce=flat\n" in out, out


def test_a_failing_run_stops_the_comparison_with_its_error():
    args = ["--preset", "tld-tiny", "--batch", "3", "--steps", "1", "--rounds", "1"]
    code, out, err = run([sys.executable, str(TOOL), *args], timeout=120)
    assert code == 1, out + err
    assert "1x4 run failed (exit code 2 before window 0)" in err
    assert "error: --batch 3 must be a multiple of the data-parallel size 4" in err
    assert "Traceback" not in err and "within 10%" not in out
