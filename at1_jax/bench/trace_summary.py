"""Kernel time by kind from a jax.profiler trace of a compiled XLA program."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_SUFFIX = re.compile(r"\.\d+$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$")


@dataclass(frozen=True)
class KernelKind:
    """One kind of kernel: its time and launches per step (exclusive of nested kernels)."""

    kind: str
    ms_per_step: float
    per_step: float


def computations(hlo_text: str) -> dict[str, str]:
    """Computation name → its body text, for an HLO module's text."""
    bodies, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        if name is None:
            m = _COMPUTATION.match(line)
            if m:
                name, lines = m.group(1), []
        elif line.startswith("}"):
            bodies[name], name = "\n".join(lines), None
        else:
            lines.append(line)
    return bodies


def kernel_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name → kind: the name without its number, marked [dot] or [conv]."""
    # A fusion is named after its root (ynn_fusion, add_convert_fusion); the mark says
    # what dominates its time.
    bodies = computations(hlo_text)
    kinds = {}
    for body in bodies.values():
        for line in body.splitlines():
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name = m.group(1)
            kind = _SUFFIX.sub("", name)
            called = _CALLS.search(line)
            inner = bodies.get(called.group(1), "") if called else ""
            if " dot(" in inner or " dot(" in line:
                kind += "[dot]"
            elif " convolution(" in inner:
                kind += "[conv]"
            kinds[name] = kind
    return kinds


def _xplane(trace_dir: str | Path) -> Path:
    found = sorted(Path(trace_dir).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{trace_dir}: no *.xplane.pb (was jax.profiler.trace used?)")
    return found[-1]


def exclusive_times(
    lines: Iterable[Iterable[tuple[str, float, float]]], kinds: dict[str, str]
) -> tuple[dict[str, float], dict[str, int]]:
    """Per kind: ns excluding nested kernels, and count, from each thread's (name, start, ns)."""
    time_ns: dict[str, float] = {}
    count: dict[str, int] = {}
    for events in lines:
        ordered = sorted((start, -duration, name) for name, start, duration in events)
        stack: list[tuple[float, str]] = []  # (end, kind) of the enclosing kernels
        for start, neg_duration, name in ordered:
            if name not in kinds:
                continue
            while stack and stack[-1][0] <= start:
                stack.pop()
            kind, duration = kinds[name], -neg_duration
            if stack:  # nested (a loop's body): not its parent's own time
                parent = stack[-1][1]
                time_ns[parent] = time_ns.get(parent, 0.0) - duration
            time_ns[kind] = time_ns.get(kind, 0.0) + duration
            count[kind] = count.get(kind, 0) + 1
            stack.append((start + duration, kind))
    return time_ns, count


def summarize(trace_dir: str | Path, hlo_text: str, steps: int) -> list[KernelKind]:
    """Kernel kinds of the program whose optimised HLO is `hlo_text`, most time first."""
    # Events are matched to the program's instructions by name, which leaves out runtime
    # wrappers (thread pools, executors, Python); nested kernels (a loop's body) are not
    # their parent's time, so the rows add up to the program's kernel time on all threads.
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(_xplane(trace_dir)))
    lines = (
        [(e.name, e.start_ns, e.duration_ns) for e in line.events]
        for plane in data.planes
        for line in plane.lines
    )
    time_ns, count = exclusive_times(lines, kernel_kinds(hlo_text))
    rows = [KernelKind(k, t / steps / 1e6, count[k] / steps) for k, t in time_ns.items()]
    return sorted(rows, key=lambda r: -r.ms_per_step)


def format_rows(rows: list[KernelKind], top: int = 15) -> str:
    """A small table: the `top` kinds and the total."""
    total = sum(r.ms_per_step for r in rows) or 1.0
    out = [f"{'kernel kind':34} {'ms/step':>9} {'share':>6} {'per step':>9}"]
    for r in rows[:top]:
        share = r.ms_per_step / total
        out.append(f"{r.kind[:34]:34} {r.ms_per_step:9.2f} {share:6.1%} {r.per_step:9.1f}")
    rest = rows[top:]
    if rest:
        ms = sum(r.ms_per_step for r in rest)
        n = sum(r.per_step for r in rest)
        out.append(f"{f'({len(rest)} other kinds)':34} {ms:9.2f} {ms / total:6.1%} {n:9.1f}")
    out.append(f"{'all kernels, all threads':34} {total:9.2f}")
    return "\n".join(out)
