"""Summarise a ``jax.profiler`` trace by op family: milliseconds per step and share of device time.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes ``perfetto_trace.json.gz`` (Chrome
trace-event JSON: ``{"traceEvents": [...]}``) under ``dir/plugins/profile/<run>/``. This module
reads it without TensorBoard or xprof:

1. Device events: complete events (``"ph": "X"`` with a ``dur`` in microseconds) of the processes
   named ``/device:...`` (GPU, TPU). Of such a process, only its ``Stream ...`` threads are read if
   it has any (the kernels as they ran; the ``XLA Ops`` / ``XLA Modules`` lines repeat them at
   coarser grain), else its ``XLA Ops`` threads, else all its threads. A trace without device
   processes (a CPU run) contributes the host events that carry an ``hlo_op`` argument (the XLA
   CPU runtime's thunks).
2. Each event is put in the first family (``FAMILIES``) whose rule matches. Rules read the event's
   kernel name and ``hlo_op`` argument, and its scope: the ``op_name`` metadata of its HLO
   instruction (``hlo_scopes`` parsed from the compiled module's text, ``op_scopes_from_hlo``) or a
   ``long_name`` / ``tf_op`` / ``scope`` argument of the event. Scopes carry JAX's name stack: the
   trainer wraps the optimizer update in ``jax.named_scope("optimizer")`` and the model the cell in
   ``"mlstm_cell"``; Flax adds module names (``norm_mlstm``, ``mh_norm``, ...).
3. Totals are divided by the number of profiled steps.

The device time summed here counts concurrent streams twice; on one stream it is the busy time,
which is less than the step's wall time by the device's idle gaps (``summarise`` reports both when
the step time is given).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
from typing import Any, Iterable

# (family, where the pattern is looked for, pattern); the first match wins
_NAME = "name"  # kernel name and hlo_op
_SCOPE = "scope"  # op_name / long_name of the event
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("collectives", _NAME, r"nccl|all-reduce|all_reduce|allreduce|all-gather|all_gather|allgather|reduce-scatter|"
                           r"reduce_scatter|all-to-all|all_to_all|collective-permute|collective_permute"),
    ("mLSTM kernels", _NAME, r"mlstm"),
    ("mLSTM kernels", _SCOPE, r"mlstm_cell|pallas_call"),
    ("matmul/gemm", _NAME, r"gemm|cublas|cutlass|nvjet|xmma|wgmma|matmul|dot|sm90_|sm80_|hgemm|sgemm"),
    ("optimizer", _SCOPE, r"optimizer"),
    ("copies/transposes", _NAME, r"copy|transpose|memcpy|memset|concatenate|dynamic-update-slice|dynamic_update_slice"),
    ("norms", _SCOPE, r"norm"),
    ("element-wise fusions", _NAME, r"fusion|loop_|elementwise|convert|broadcast|reduce|add|multiply|select"),
)
FAMILY_ORDER = (
    "mLSTM kernels", "matmul/gemm", "element-wise fusions", "norms", "optimizer", "copies/transposes",
    "collectives", "other",
)


@dataclasses.dataclass(frozen=True)
class DeviceEvent:
    """One kernel / op execution on a device: its name, hlo_op (or ""), scope (or ""), duration (us)."""

    name: str
    hlo_op: str
    scope: str
    dur_us: float


def find_trace_file(trace_dir: str) -> str:
    """The newest ``perfetto_trace.json.gz`` (else ``*.trace.json.gz``) under ``trace_dir``;
    ``FileNotFoundError`` naming the directory if there is none."""
    for pattern in ("perfetto_trace.json.gz", "*.trace.json.gz", "perfetto_trace.json", "*.trace.json"):
        hits = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", pattern))
        hits += glob.glob(os.path.join(trace_dir, pattern))
        if hits:
            return max(hits, key=os.path.getmtime)
    raise FileNotFoundError(f"no trace file (perfetto_trace.json.gz) under {trace_dir!r}/plugins/profile/*/")


def load_trace(path: str) -> list[dict[str, Any]]:
    """The trace events of a Chrome trace-event JSON file (gzipped or not; an object with
    ``traceEvents`` or a bare list). ``ValueError`` if it is neither."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path!r} is not a Chrome trace-event file (no traceEvents list)")
    return [e for e in events if isinstance(e, dict)]


def op_scopes_from_hlo(hlo_text: str) -> dict[str, str]:
    """{instruction name: op_name metadata} of an HLO module's text (``compiled.as_text()``)."""
    out: dict[str, str] = {}
    pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name="([^"]*)"')
    for line in hlo_text.splitlines():
        m = pattern.match(line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def device_events(events: Iterable[dict[str, Any]], hlo_scopes: dict[str, str] | None = None) -> list[DeviceEvent]:
    """The device events of a trace (see the module docstring, step 1), with their scopes."""
    events = list(events)
    hlo_scopes = hlo_scopes or {}
    proc_names: dict[Any, str] = {}
    thread_names: dict[tuple[Any, Any], str] = {}
    for e in events:
        if e.get("ph") != "M":
            continue
        name = str((e.get("args") or {}).get("name", ""))
        if e.get("name") == "process_name":
            proc_names[e.get("pid")] = name
        elif e.get("name") == "thread_name":
            thread_names[(e.get("pid"), e.get("tid"))] = name
    device_pids = {pid for pid, n in proc_names.items() if "/device:" in n.lower() or n.lower().startswith("/gpu")}
    keep: set[tuple[Any, Any]] = set()
    for pid in device_pids:
        threads = {k: n for k, n in thread_names.items() if k[0] == pid}
        streams = {k for k, n in threads.items() if n.lower().startswith("stream")}
        ops = {k for k, n in threads.items() if "xla ops" in n.lower()}
        keep |= streams or ops or set(threads) or {(pid, None)}
    picked = []
    for e in events:
        if e.get("ph") != "X" or not isinstance(e.get("dur"), (int, float)):
            continue
        args = e.get("args") or {}
        hlo_op = str(args.get("hlo_op", ""))
        if device_pids:
            key = (e.get("pid"), e.get("tid"))
            if e.get("pid") not in device_pids or (key not in keep and (e.get("pid"), None) not in keep):
                continue
        elif not hlo_op:
            continue
        picked.append(e)
    out = []
    for e in _leaves(picked):
        args = e.get("args") or {}
        hlo_op = str(args.get("hlo_op", ""))
        scope = hlo_scopes.get(hlo_op) or str(args.get("long_name") or args.get("tf_op") or args.get("scope") or "")
        out.append(DeviceEvent(str(e.get("name", "")), hlo_op, scope, float(e["dur"])))
    return out


def _leaves(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events that contain no other event of their thread (a CPU trace nests the ops of a
    ``while`` loop inside the loop's event). Containment means the next event of the thread starts
    and ends inside this one: GPU kernels do not nest, but consecutive kernels of one stream often
    overlap by a fraction of a microsecond in the trace's clock, and such a partial overlap must not
    drop either kernel (it once dropped 60% of a training step's device time)."""
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for e in events:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    out = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e.get("ts", 0.0)), -float(e["dur"])))
        for idx, e in enumerate(evs):
            end = float(e.get("ts", 0.0)) + float(e["dur"])
            nxt = evs[idx + 1] if idx + 1 < len(evs) else None
            contains_next = (
                nxt is not None and float(e["dur"]) > 0.0
                and float(nxt.get("ts", 0.0)) + float(nxt["dur"]) <= end
            )
            if not contains_next:
                out.append(e)
    return out


def classify(event: DeviceEvent) -> str:
    """The family (``FAMILY_ORDER``) of one device event."""
    name_text = f"{event.name} {event.hlo_op}".lower()
    scope_text = event.scope.lower()
    for family, where, pattern in FAMILIES:
        if re.search(pattern, name_text if where == _NAME else scope_text):
            return family
    return "other"


def summarise(
    events: Iterable[DeviceEvent], steps: int, step_ms: float | None = None, top: int = 8
) -> dict[str, Any]:
    """Per family: ms per step, share of device time, events per step; also the busy ms per step,
    the ``top`` kernels by time, and (with ``step_ms``, the measured step time) the idle share."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    totals = {f: 0.0 for f in FAMILY_ORDER}
    counts = {f: 0 for f in FAMILY_ORDER}
    kernels: dict[tuple[str, str], float] = {}
    for ev in events:
        fam = classify(ev)
        totals[fam] += ev.dur_us
        counts[fam] += 1
        kernels[(ev.name, fam)] = kernels.get((ev.name, fam), 0.0) + ev.dur_us
    busy_us = sum(totals.values())
    rows = [
        {
            "family": f, "ms_per_step": totals[f] / 1e3 / steps,
            "share": totals[f] / busy_us if busy_us else 0.0, "events_per_step": counts[f] / steps,
        }
        for f in FAMILY_ORDER
    ]
    top_rows = [
        {"kernel": n, "family": fam, "ms_per_step": t / 1e3 / steps}
        for (n, fam), t in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    ]
    out = {"steps": steps, "busy_ms_per_step": busy_us / 1e3 / steps, "families": rows, "top_kernels": top_rows}
    if step_ms is not None:
        out["step_ms"] = step_ms
        out["idle_share"] = max(0.0, 1.0 - out["busy_ms_per_step"] / step_ms) if step_ms > 0 else None
    return out


_PALLAS_KERNEL = re.compile(r"mlstm|pallas|triton|mosaic", re.IGNORECASE)


def kernel_breakdown(events: Iterable[DeviceEvent], calls: int) -> dict[str, Any]:
    """Per kernel name (a Pallas kernel's name, or an XLA fusion/instruction name): ms per call,
    launches per call, share of the device-busy time, kind ``pallas`` or ``xla``; sorted by time.
    Also the busy ms per call in total and split by kind, and the launches per call."""
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be a positive int; got {calls!r}")
    by_name: dict[str, list[float]] = {}
    for ev in events:
        acc = by_name.setdefault(ev.name, [0.0, 0])
        acc[0] += ev.dur_us
        acc[1] += 1
    busy_us = sum(t for t, _ in by_name.values())
    rows = []
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0]):
        kind = "pallas" if _PALLAS_KERNEL.search(name) else "xla"
        rows.append({"name": name, "kind": kind, "ms": t / 1e3 / calls, "count": n / calls,
                     "share": t / busy_us if busy_us else 0.0})
    return {
        "calls": calls, "busy_ms": busy_us / 1e3 / calls,
        "pallas_ms": sum(r["ms"] for r in rows if r["kind"] == "pallas"),
        "xla_ms": sum(r["ms"] for r in rows if r["kind"] == "xla"),
        "launches": sum(r["count"] for r in rows), "kernels": rows,
    }


def summarise_dir(trace_dir: str, steps: int, hlo_text: str | None = None, step_ms: float | None = None) -> dict[str, Any]:
    """``summarise`` of the trace under ``trace_dir`` (``find_trace_file``); ``hlo_text``: the
    compiled module's text for the scopes of its instructions. Adds the ``trace_file`` read."""
    path = find_trace_file(trace_dir)
    scopes = op_scopes_from_hlo(hlo_text) if hlo_text else None
    out = summarise(device_events(load_trace(path), scopes), steps, step_ms)
    out["trace_file"] = path
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The family table (and the top kernels) of a ``summarise`` result, as text."""
    lines = [f"{'op family':<22} {'ms/step':>9} {'share':>7} {'events/step':>12}"]
    for r in summary["families"]:
        lines.append(f"{r['family']:<22} {r['ms_per_step']:>9.2f} {r['share']:>7.1%} {r['events_per_step']:>12.1f}")
    busy = f"{'device busy':<22} {summary['busy_ms_per_step']:>9.2f}"
    if summary.get("step_ms") is not None:
        busy += f"   (step {summary['step_ms']:.2f} ms"
        if summary.get("idle_share") is not None:
            busy += f", idle {summary['idle_share']:.1%}"
        busy += ")"
    lines.append(busy)
    if summary["top_kernels"]:
        lines.append("top kernels:")
        for r in summary["top_kernels"]:
            lines.append(f"  {r['ms_per_step']:>8.2f} ms  [{r['family']}]  {r['kernel'][:90]}")
    return "\n".join(lines)
