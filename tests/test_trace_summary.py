"""at1_jax.bench.trace_summary: kernel kinds from HLO, exclusive times, a real trace."""

import jax
import jax.numpy as jnp
import pytest

from at1_jax.bench import trace_summary

HLO = """HloModule m, entry_computation_layout={(f32[4,4]{1,0})->f32[4,4]{1,0}}

%fused_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.3 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (p0.1: f32[4,4]) -> f32[4,4] {
  %p0.1 = f32[4,4]{1,0} parameter(0)
  ROOT %add.7 = f32[4,4]{1,0} add(%p0.1, %p0.1)
}

ENTRY %main.9 (x: f32[4,4]) -> f32[4,4] {
  %x = f32[4,4]{1,0} parameter(0)
  %ynn_fusion.2 = f32[4,4]{1,0} fusion(%x, %x), kind=kCustom, calls=%fused_dot
  %dot.5 = f32[4,4]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %add_fusion.12 = f32[4,4]{1,0} fusion(%ynn_fusion.2), kind=kLoop, calls=%fused_add
}
"""


def test_kinds_drop_the_number_and_mark_what_multiplies_matrices():
    kinds = trace_summary.kernel_kinds(HLO)
    assert kinds["ynn_fusion.2"] == "ynn_fusion[dot]"
    assert kinds["dot.5"] == "dot[dot]"
    assert kinds["add_fusion.12"] == "add_fusion"
    assert kinds["p0.1"] == "p0"  # fused instructions are named too; no event carries them


def test_nested_kernels_are_not_their_parents_time():
    kinds = {"while.1": "while", "body_fusion.2": "body_fusion", "other.3": "other"}
    # A loop of 100 ns whose body ran twice for 30 ns, then a kernel after it; a runtime
    # wrapper that is no kernel; the body once more on another thread.
    loop = [("while.1", 0, 100), ("body_fusion.2", 10, 30), ("body_fusion.2", 50, 30)]
    after = [("other.3", 100, 5), ("ThreadPool::Await", 10, 80)]
    threads = [loop + after, [("body_fusion.2", 0, 7)]]
    time_ns, count = trace_summary.exclusive_times(threads, kinds)
    assert time_ns == {"while": 40, "body_fusion": 67, "other": 5}
    assert count == {"while": 1, "body_fusion": 3, "other": 1}


def test_a_real_trace_counts_each_kernel_once_per_step(tmp_path):
    def f(x, w):
        y = jnp.tanh(x @ w)
        return jax.lax.fori_loop(0, 3, lambda i, a: a * 0.5 + 1.0, y)

    args = (jnp.ones((64, 64)), jnp.ones((64, 64)))
    compiled = jax.jit(f).lower(*args).compile()
    compiled(*args).block_until_ready()
    steps = 4
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(steps):
            compiled(*args).block_until_ready()
    rows = trace_summary.summarize(tmp_path, compiled.as_text(), steps)
    by_kind = {r.kind: r for r in rows}
    dots = [r for r in rows if r.kind.endswith("[dot]")]
    assert len(dots) == 1 and dots[0].per_step == 1 and dots[0].ms_per_step > 0
    assert by_kind["while"].per_step == 1  # the loop itself, its body's kernels apart
    assert all(r.ms_per_step >= 0 for r in rows)
    table = trace_summary.format_rows(rows, top=1)
    assert table.splitlines()[1].startswith(rows[0].kind)
    assert "other kinds" in table and "all kernels, all threads" in table


def test_a_folder_without_a_trace_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        trace_summary.summarize(tmp_path, HLO, 1)
