"""Pick the small row's tuned entry from one bench run of its candidates (scripts/gpu_choose.sh).

Usage: python3 scripts/choose_small.py BENCH_JSON OUT_TABLE [TEST_LOG ...]
Reads the fw / fwbw rows of ``xlstm-jax bench --json`` (candidates ``chunkwise_pallas:OPTIONS`` and
the shipped ``chunkwise_auto``), drops every candidate with an option whose compiled tests failed in
one of TEST_LOGs (a log without a "passed" summary, or with FAILED / ERROR lines, voids all the new
options), and writes OUT_TABLE: a tuning table (format xlstm_jax.tuning/1) holding the shipped small
entry with the params of the fastest candidate by fwbw (the shipped entry stays when it is the
fastest). Prints the candidates and the choice.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.getcwd())
from xlstm_jax.kernels.mlstm_chunkwise.pallas import tuning  # noqa: E402

NEW_OPTIONS = {("gates_impl", "kernel"), ("gate_grads_impl", "kernel")}


def tests_passed(logs) -> bool:
    for path in logs:
        try:
            text = open(path).read()
        except OSError:
            return False
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines or "passed" not in lines[-1]:
            return False
        if any(line.startswith(("FAILED", "ERROR")) for line in text.splitlines()):
            return False
    return True


def main(bench_json, out_table, *logs):
    rows = json.load(open(bench_json))["results"]
    times: dict[str, dict] = {}
    for r in rows:
        if r.get("nan") or "ms" not in r or r["grad_mode"] != "exact":
            continue
        label = r["kernel"] + "".join(f",{k}={v}" for k, v in sorted(r["options"].items()))
        times.setdefault(label, {"options": r["options"]})[r["mode"]] = r["ms"]
    ok_new = tests_passed(logs)
    print(f"compiled tests of the new options passed: {ok_new}")
    best, best_ms = None, None
    for label, t in times.items():
        opts = t["options"]
        usable = "fwbw" in t and (ok_new or not (set(opts.items()) & NEW_OPTIONS))
        print(f"  {label}: fw {t.get('fw', float('nan')):.3f} fwbw {t.get('fwbw', float('nan')):.3f} ms"
              + ("" if usable else " (not usable)"))
        if usable and (best_ms is None or t["fwbw"] < best_ms):
            best, best_ms = label, t["fwbw"]
    shipped = json.load(open(tuning.SHIPPED))
    entry = next(e for e in shipped["entries"] if (e["NH"], e["DHQK"], e["DHV"], e["B"], e["S"], e["grad_mode"])
                 == (8, 64, 128, 16, 2048, "exact"))
    if best is not None and best != "chunkwise_auto":
        entry = dict(entry, params=dict(times[best]["options"]), ms={"fwbw": round(best_ms, 4)},
                     date="2026-12-02", note="scripts/gpu_choose.sh: the fastest fwbw of the candidates in one call")
    print(f"chosen: {best} -> params {entry['params']}")
    with open(out_table, "w") as fh:
        json.dump({"format": shipped["format"], "entries": [entry]}, fh, indent=1)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
