#!/usr/bin/env bash
# Speed of the Pallas chunkwise (TFLA) kernels against the peer (mlstm_kernels' Triton limit-chunk
# kernels, chunk 64) at the seven benchmark rows, after autotuning. Run on the GPU machine from the
# repository root (device tool), carrying .whl and .peers (ignored by git):
#     OUT=$OUT bash scripts/gpu_speed.sh
# Steps, each in its own processes (one per head preset: a Triton abort loses one group only),
# every process under a timeout:
#   (a) `xlstm-jax tune` for the seven rows (standard and 7b heads at 32x2048, 8x8192, 2x32768;
#       small heads at 16x2048), grad mode exact, objective fwbw, TUNE_BUDGET_S seconds in all
#       (split evenly over the rows); entries go to $OUT/tuning_cache.json (the user cache of the
#       later steps) and $OUT/tune_<heads>.json (the format of the shipped tuned_defaults.json);
#   (b) `xlstm-jax bench --kernels chunkwise_pallas` at the same rows, exact and tfla, with the
#       tuned table applied ($XLSTM_JAX_TUNING_CACHE=$OUT/tuning_cache.json): $OUT/bench_<heads>.json;
#   (c) the peer, `.peers/peer_shapes.py limit64 HEADS SHAPES` (wheels from .whl installed into
#       /tmp/peers): $OUT/peer_<heads>.jsonl; with OURS_PEER_TIMER=1 also ours (ours_exact,
#       ours_tfla, tuned) through the same script and timer;
#   (d) the table (printed last, also $OUT/speed_summary.json): ours fw / fwbw (tuned, exact; fwbw
#       tfla), peer fw / fwbw, the ratios, the goal (fw <= 0.5 x peer and fwbw <= 0.6 x peer, exact
#       gradients) and the tuned parameters of each row.
# Expected wall time on an H200: ~3.5 min tuning, ~2.5 min bench, ~2 min peer (set TUNE_BUDGET_S lower
# to save time: each row gets TUNE_BUDGET_S / 7 seconds of search, at least 5).
# Environment (defaults in brackets):
#   OUT             output folder                                               [/tmp/xlstm_speed]
#   TUNE_BUDGET_S   search seconds of (a), all rows together                    [175]
#   TUNE_THREADS    candidates compiled concurrently by the tuner               [4]
#   SKIP_TUNE       1: skip (a) and use $OUT/tuning_cache.json as it is         [0]
#   REPS            timed calls per bench measurement                           [10]
#   BENCH_GRAD_MODES  gradient modes of (b)                                    [exact tfla]
#   BENCH_KERNELS   kernels of (b); the table shows chunkwise_pallas as "ours" and
#                   every other kernel or option set (chunkwise_mosaic, chunkwise_auto, ...) in a
#                   table of its own                                             [chunkwise_pallas]
#   OURS_PEER_TIMER 1: also time ours through .peers/peer_shapes.py             [0]
#   PY              python                                                      [python3]
#   ONLY_TABLE      1: only (d), from the files already in $OUT                 [0]
#   PEER_FIRST      1: run (c) before (b)                                      [0]
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/xlstm_speed}; mkdir -p "$OUT"
TUNE_BUDGET_S=${TUNE_BUDGET_S:-175}; TUNE_THREADS=${TUNE_THREADS:-4}; SKIP_TUNE=${SKIP_TUNE:-0}
REPS=${REPS:-10}; OURS_PEER_TIMER=${OURS_PEER_TIMER:-0}; PY=${PY:-python3}; ONLY_TABLE=${ONLY_TABLE:-0}
export XLSTM_JAX_TUNING_CACHE=$OUT/tuning_cache.json
PER_KEY=$(( TUNE_BUDGET_S / 7 )); [ "$PER_KEY" -ge 5 ] || PER_KEY=5
STD_SHAPES="32,2048;8,8192;2,32768"
# preset name of xlstm-jax | name in peer_shapes.py | shapes | rows
GROUPS_=("standard std $STD_SHAPES 3" "7b 7b $STD_SHAPES 3" "small 350m 16,2048 1")
t_all=$(date +%s)
status=()

if [ "$ONLY_TABLE" != 1 ]; then
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/env.txt"
$PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1 | tee -a "$OUT/env.txt"

# (a) tune ------------------------------------------------------------------------------------------
if [ "$SKIP_TUNE" != 1 ]; then
  for g in "${GROUPS_[@]}"; do
    read -r heads peer shapes rows <<<"$g"
    T=$(( rows * (PER_KEY + 60) + 60 )); t0=$(date +%s)
    timeout -k 10 "$T" $PY -m xlstm_jax tune --heads "$heads" --shapes "$shapes" --grad-mode exact \
      --objective fwbw --report-modes fwbw --budget-s "$PER_KEY" --compile-threads "$TUNE_THREADS" --cache "$XLSTM_JAX_TUNING_CACHE" \
      --json "$OUT/tune_$heads.json" --trials-json "$OUT/tune_${heads}_trials.json" \
      >"$OUT/tune_$heads.log" 2>&1
    rc=$?
    status+=("tune $heads: rc=$rc ($(( $(date +%s) - t0 )) s, limit $T s)")
    sed -n '/^key /,$p' "$OUT/tune_$heads.log" | head -n 8
    [ "$rc" = 0 ] || tail -n 5 "$OUT/tune_$heads.log"
  done
fi

bench_ours() {
# (b) bench with the tuned table -------------------------------------------------------------------
for g in "${GROUPS_[@]}"; do
  read -r heads peer shapes rows <<<"$g"
  T=$(( rows * 90 + 60 )); t0=$(date +%s)
  nk=$(wc -w <<<"${BENCH_KERNELS:-chunkwise_pallas}"); T=$(( T * nk ))
  timeout -k 10 "$T" $PY -m xlstm_jax bench --kernels ${BENCH_KERNELS:-chunkwise_pallas} --heads "$heads" --shapes "$shapes" \
    --grad-mode ${BENCH_GRAD_MODES:-exact tfla} --no-ceilings --reps "$REPS" --warmup 2 --label tuned \
    --json "$OUT/bench_$heads.json" >"$OUT/bench_$heads.log" 2>&1
  status+=("bench $heads: rc=$? ($(( $(date +%s) - t0 )) s, limit $T s)")
done

}

peer_run() {
# (c) the peer (and optionally ours) through .peers/peer_shapes.py ----------------------------------
if [ -f .peers/peer_shapes.py ] && ls .whl/*.whl >/dev/null 2>&1; then
  impls="limit64"; [ "$OURS_PEER_TIMER" = 1 ] && impls="limit64 ours_exact ours_tfla"
  for g in "${GROUPS_[@]}"; do
    read -r heads peer shapes rows <<<"$g"
    for impl in $impls; do
      t0=$(date +%s)
      OUT="$OUT" PY=$PY bash scripts/peer_rows.sh "$impl" "$peer" "$shapes" "$heads" $(( rows * 60 + 60 ))
      rc=$?
      status+=("peer $impl $heads: rc=$rc ($(( $(date +%s) - t0 )) s) $(wc -l <"$OUT/peer_${impl}_$heads.jsonl" 2>/dev/null) results")
    done
  done
else
  status+=("peer: skipped (carry .peers/peer_shapes.py and .whl/*.whl)")
fi

}

# PEER_FIRST=1: the peer before ours (a call that may be cut short keeps the peer's figures)
if [ "${PEER_FIRST:-0}" = 1 ]; then peer_run; bench_ours; else bench_ours; peer_run; fi

fi  # ONLY_TABLE

# (d) the table ------------------------------------------------------------------------------------
echo "==================== steps ===================="
for line in "${status[@]}"; do echo "$line"; done
echo "total $(( $(date +%s) - t_all )) s"
OUT="$OUT" $PY - <<'EOF'
import glob, json, os

out = os.environ["OUT"]
PEER_HEADS = {"std": "standard", "7b": "7b", "350m": "small"}
ROWS = [("standard", 32, 2048), ("standard", 8, 8192), ("standard", 2, 32768),
        ("7b", 32, 2048), ("7b", 8, 8192), ("7b", 2, 32768), ("small", 16, 2048)]


def load(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


ours = {}  # (heads, B, S, grad_mode, mode) -> ms (chunkwise_pallas, no explicit options)
mosaic = {}  # label ("kernel[:options]") -> the same for every other kernel or option set
params = {}  # (heads, B, S, grad_mode) -> (source, kernel params)
fam = {}  # (label, heads, B, S) -> chunkwise_auto's family and options
for path in glob.glob(os.path.join(out, "bench_*.json")):
    for r in (load(path) or {}).get("results", []):
        key = (r["heads"], r["B"], r["S"], r["grad_mode"], r["mode"])
        if r["kernel"] != "chunkwise_pallas" or r.get("options"):  # its own table (chunkwise_mosaic, chunkwise_auto, ...)
            label = r["kernel"] + "".join(
                (":" if i == 0 else ",") + f"{k}={v}" for i, (k, v) in enumerate((r.get("options") or {}).items()))
            mosaic.setdefault(label, {})[key] = r.get("ms", r.get("error", "error"))
            if "family" in r and r["grad_mode"] == "exact":  # chunkwise_auto: what it ran
                fam[(label, r["heads"], r["B"], r["S"])] = r["family"] + (
                    " " + ",".join(f"{k}={v}" for k, v in r["mosaic_options"].items()) if r.get("mosaic_options") else "")
            continue
        if "ms" in r:
            ours[key] = r["ms"]
        if "kernel_params" in r:
            params[(r["heads"], r["B"], r["S"], r["grad_mode"])] = (r.get("tuning_source"), r["kernel_params"])
tuned = {}  # (heads, B, S) -> tuner entry
for path in glob.glob(os.path.join(out, "tune_*.json")):
    if path.endswith("_trials.json"):
        continue
    heads = os.path.basename(path)[len("tune_"):-len(".json")]
    for e in (load(path) or {}).get("entries", []):
        tuned[(heads, e["B"], e["S"])] = e
peer, ours_pt = {}, {}
for path in glob.glob(os.path.join(out, "peer_*.jsonl")):
    with open(path) as fh:
        for line in fh:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "fw_ms" not in r:
                continue
            key = (PEER_HEADS.get(r["heads"], r["heads"]), r["B"], r["S"])
            if r["impl"] == "limit64":
                peer[key] = r
            elif r["impl"].startswith("ours_"):
                ours_pt[key + (r["impl"][5:],)] = r


def f(x, w=7, d=2):
    return f"{x:{w}.{d}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"


def g(x):
    return f"{x:.2f}" if isinstance(x, (int, float)) else "-"


SHORT = {"recompute_states_in_bw": "recompute", "chunk_size_intra": "L", "chunk_size_inter": "L_inter"}


def short(p):
    return ",".join(f"{SHORT.get(k, k.replace('siz_b_', ''))}={v}" for k, v in p.items()) or "(heuristics)"


def goal_of(r_fw, r_bw):
    return "-" if r_fw is None or r_bw is None else ("y" if r_fw <= 0.5 and r_bw <= 0.6 else "n")


rows = []
print("\nours = chunkwise_pallas with the tuned table (xlstm-jax bench, exact grads unless noted); "
      "peer = mlstm_kernels triton_limit_chunk, chunk 64 (.peers/peer_shapes.py); ms, bf16")
print(f"{'heads':<9}{'B x S':>9}{'fw':>8}{'fwbw':>8}{'fwbw tfla':>10}{'peer fw':>9}{'peer fwbw':>10}"
      f"{'fw/peer':>8}{'fwbw/peer':>10}{'goal':>5}  tuned (vs heuristics; default->tuned fwbw ms)")
for heads, B, S in ROWS:
    fw, fwbw = ours.get((heads, B, S, "exact", "fw")), ours.get((heads, B, S, "exact", "fwbw"))
    fwbw_t = ours.get((heads, B, S, "tfla", "fwbw"))
    p = peer.get((heads, B, S), {})
    pfw, pfwbw = p.get("fw_ms"), p.get("fwbw_ms")
    r_fw = fw / pfw if fw and pfw else None
    r_bw = fwbw / pfwbw if fwbw and pfwbw else None
    goal = "-" if r_fw is None or r_bw is None else ("y" if r_fw <= 0.5 and r_bw <= 0.6 else "n")
    e = tuned.get((heads, B, S))
    src = params.get((heads, B, S, "exact"), (None, None))[0]
    ttxt = "not tuned" if e is None else (
        f"{short(e['params'])} ({g(e['ms'].get('fwbw_default'))}->{g(e['ms'].get('fwbw'))})")
    if src and src == "heuristics" and e is not None and e["params"]:
        ttxt += " [bench did NOT use it]"
    print(f"{heads:<9}{f'{B}x{S}':>9}{f(fw, 8)}{f(fwbw, 8)}{f(fwbw_t, 10)}{f(pfw, 9)}{f(pfwbw, 10)}"
          f"{f(r_fw, 8)}{f(r_bw, 10)}{goal:>5}  {ttxt}")
    rows.append(dict(heads=heads, B=B, S=S, fw_ms=fw, fwbw_ms=fwbw, fwbw_tfla_ms=fwbw_t, peer_fw_ms=pfw,
                     peer_fwbw_ms=pfwbw, fw_ratio=r_fw, fwbw_ratio=r_bw, goal_met=goal,
                     tuned_entry=e, bench_params=params.get((heads, B, S, "exact")),
                     ours_peer_timer={m: ours_pt.get((heads, B, S, m)) for m in ("exact", "tfla")}))
for label, res in sorted(mosaic.items()):
    print(f"\n{label} (same bench call), ms and ratio to the peer:")
    print(f"{'heads':<9}{'B x S':>9}{'fw':>8}{'fwbw':>8}{'fwbw tfla':>10}{'fw/peer':>8}{'fwbw/peer':>10}"
          f"{'fw/pallas':>10}{'fwbw/pallas':>12}{'goal':>5}")
    for heads, B, S in ROWS:
        m = {k: res.get((heads, B, S) + k) for k in (("exact", "fw"), ("exact", "fwbw"), ("tfla", "fwbw"))}
        if not any(m.values()):
            continue
        num = {k: v if isinstance(v, (int, float)) else None for k, v in m.items()}
        p = peer.get((heads, B, S), {})
        fw, bw = num[("exact", "fw")], num[("exact", "fwbw")]
        ofw, obw = ours.get((heads, B, S, "exact", "fw")), ours.get((heads, B, S, "exact", "fwbw"))
        rat = lambda a, b: a / b if a and b else None  # noqa: E731
        print(f"{heads:<9}{f'{B}x{S}':>9}{f(fw, 8)}{f(bw, 8)}{f(num[('tfla', 'fwbw')], 10)}"
              f"{f(rat(fw, p.get('fw_ms')), 8)}{f(rat(bw, p.get('fwbw_ms')), 10)}{f(rat(fw, ofw), 10)}{f(rat(bw, obw), 12)}"
              + f"{goal_of(rat(fw, p.get('fw_ms')), rat(bw, p.get('fwbw_ms'))):>5}"
              + (f"  {fam[(label, heads, B, S)]}" if (label, heads, B, S) in fam else "")
              + "".join(f"  {k[1]} {k[0]}: {v[:60]}" for k, v in m.items() if isinstance(v, str)))
        for r in rows:
            if (r["heads"], r["B"], r["S"]) == (heads, B, S):
                r.setdefault("mosaic", {})[label] = {f"{k[1]}_{k[0]}": v for k, v in m.items()}
if ours_pt:
    print("\nours through peer_shapes.py (same timer as the peer), fw / fwbw ms:")
    for heads, B, S in ROWS:
        ex, tf = ours_pt.get((heads, B, S, "exact"), {}), ours_pt.get((heads, B, S, "tfla"), {})
        print(f"{heads:<9}{f'{B}x{S}':>9}  exact {f(ex.get('fw_ms'))} / {f(ex.get('fwbw_ms'))}"
              f"   tfla {f(tf.get('fw_ms'))} / {f(tf.get('fwbw_ms'))}")
env = open(os.path.join(out, "env.txt")).read() if os.path.exists(os.path.join(out, "env.txt")) else ""
with open(os.path.join(out, "speed_summary.json"), "w") as fh:
    json.dump({"env": env, "rows": rows}, fh, indent=1)
print(f"goal: fw <= 0.5 x peer and fwbw <= 0.6 x peer (exact gradients). JSON: {out}/speed_summary.json; "
      f"tuned entries (shipped format): {out}/tune_*.json")
EOF
