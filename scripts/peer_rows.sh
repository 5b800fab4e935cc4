#!/usr/bin/env bash
# One group of peer measurements: `.peers/peer_shapes.py IMPL PEER_HEADS SHAPES` in its own process
# under LIMIT seconds, with the peer wheels of .whl installed into /tmp/peers first (once per
# machine; carry .whl and .peers). Writes $OUT/peer_IMPL_NAME.log and $OUT/peer_IMPL_NAME.jsonl (its
# RESULT lines). Exit status: the measurement's (124 on timeout), 3 without .peers or .whl, 4 if
# the wheels do not install. Used by gpu_speed.sh and gpu_final.sh.
# Usage (repository root): OUT=DIR [PY=python3] bash scripts/peer_rows.sh IMPL PEER_HEADS SHAPES NAME LIMIT
set -u
impl=$1; peer=$2; shapes=$3; name=$4; limit=$5
OUT=${OUT:?OUT must name the output folder}; PY=${PY:-python3}
if [ ! -f .peers/peer_shapes.py ] || ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "peer_rows.sh: carry .peers/peer_shapes.py and .whl/*.whl" >&2
  exit 3
fi
if [ ! -f /tmp/peers/.installed ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/peers .whl/*.whl >"$OUT/peer_install.log" 2>&1 || {
    echo "peer_rows.sh: the peer wheels did not install (see $OUT/peer_install.log)" >&2
    exit 4
  }
  touch /tmp/peers/.installed
fi
PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH} timeout -k 10 "$limit" $PY .peers/peer_shapes.py "$impl" "$peer" "$shapes" \
  >"$OUT/peer_${impl}_$name.log" 2>&1
rc=$?
grep '^RESULT ' "$OUT/peer_${impl}_$name.log" | sed 's/^RESULT //' >"$OUT/peer_${impl}_$name.jsonl"
exit $rc
