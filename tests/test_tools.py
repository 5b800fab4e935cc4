"""The tools: ``check`` (sequence and step kernels), ``bench`` (workload, --heads, --check),
``bench-decode`` at a tiny shape, and the one timing helper."""

import json

import jax
import jax.numpy as jnp
import pytest

from xlstm_jax import cli
from xlstm_jax.kernels import available_mlstm_step_kernels, registry
from xlstm_jax.tools import bench, timing, workload


def test_check_covers_sequence_and_step_kernels(capsys, tmp_path):
    path = tmp_path / "check.json"
    rc = cli.main(["check", "--shape", "1,2,20,16,16", "--steps", "5", "--reps", "1",
                   "--kernels", "chunkwise_native", "recurrent_native", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "chunkwise_native" in out and "all within" in out and "after 5 steps" in out
    result = json.loads(path.read_text())
    assert [r["kernel"] for r in result["rows"]] == ["chunkwise_native", "recurrent_native"]
    assert sorted(r["kernel"] for r in result["step_rows"]) == available_mlstm_step_kernels()
    for row in result["step_rows"]:
        for col in ("h@1", "C@1", "n@1", "m@1", "h", "C", "n", "m"):
            assert row[col] < 1e-5, (row["kernel"], col, row[col])  # NaN fails too


def test_check_fails_a_wrong_step_kernel(capsys, monkeypatch):
    """A step kernel whose C update is 1% off fails the check (exit status 1, FAIL in its row only)."""
    good = registry.get_mlstm_step_kernel("recurrent_native")

    def wrong_step(matC, vecN, scaM, q, k, v, i, f, **kw):
        h, (c, n, m) = good(matC, vecN, scaM, q, k, v, i, f, **kw)
        return h, (1.01 * c, n, m)

    registry._load()
    monkeypatch.setitem(registry._STEP_REGISTRY, "wrong_step", registry.KernelSpec("wrong_step", wrong_step, {}, "test"))
    rc = cli.main(["check", "--shape", "1,1,8,8,8", "--steps", "3", "--reps", "1", "--kernels",
                   "--step-kernels", "recurrent_native", "wrong_step"])
    out = capsys.readouterr().out
    assert rc == 1, out
    wrong = next(line for line in out.splitlines() if line.startswith("wrong_step"))
    native = next(line for line in out.splitlines() if line.startswith("recurrent_native"))
    assert "FAIL" in wrong and "FAIL" not in native and "FAILED" in out


def test_heads_and_shapes_parsing():
    assert workload.parse_heads("standard") == workload.Heads("standard", 16, 128, 256)
    assert workload.parse_heads("7b") == workload.Heads("7b", 8, 256, 512)
    assert workload.parse_heads("small") == workload.Heads("small", 8, 64, 128)
    assert workload.parse_heads(" 4, 32,64 ") == workload.Heads("4,32,64", 4, 32, 64)
    for bad in ("huge", "1,2", "1,2,3,4", "0,16,16", "a,b,c", ""):
        with pytest.raises(ValueError, match="NH,DHQK,DHV"):
            workload.parse_heads(bad)
    assert workload.parse_shapes("32,2048;8,8192") == ((32, 2048), (8, 8192))
    assert workload.parse_shapes("32x2048,8x8192") == ((32, 2048), (8, 8192))
    for bad in ("64", "1,2,3", "0,64", "a,b", ";", "2x"):
        with pytest.raises(ValueError, match="B,S"):
            workload.parse_shapes(bad)
    # default: all three presets, each at its own shapes
    args = cli.build_parser().parse_args(["bench"])
    assert args.heads is None
    cases = bench.workload_cases(None, None)
    assert [(h.name, B, S) for h, B, S in cases] == [
        ("standard", 32, 2048), ("standard", 8, 8192), ("standard", 2, 32768),
        ("7b", 32, 2048), ("7b", 8, 8192), ("7b", 2, 32768), ("small", 16, 2048)]
    args = cli.build_parser().parse_args(["bench", "--heads", "7b", "--heads", "2,16,32", "--shapes", "1,64"])
    assert [(h.name, h.NH, B, S) for h, B, S in bench.workload_cases(args.heads, args.shapes)] == [
        ("7b", 8, 1, 64), ("2,16,32", 2, 1, 64)]
    # 65,536 tokens for the 65k shapes; the nominal forward count of the standard workload: 0.19 TFLOP
    assert all(B * S == 65536 for B, S in workload.STANDARD_SHAPES)
    fw = sum(workload.nominal_flops(B, 16, S, 128, 256, "fw") for B, S in [(8, 8192)])
    assert fw == 2 * (64 * 128 + 64 * 256 + 2 * 128 * 256) * 65536 * 16
    assert workload.nominal_flops(8, 16, 8192, 128, 256, "fwbw") == 3 * fw


def test_bench_runs_with_check(capsys, tmp_path):
    path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--shapes", "1,64", "--heads", "1,16,16", "--reps", "2", "--warmup", "1",
                   "--dtype", "float32", "--kernels", "chunkwise_native:chunk_size=16", "--check", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "chunkwise_native:chunk_size=16" in out and "--check" in out
    result = json.loads(path.read_text())
    rows = result["results"]
    assert [(r["mode"], r["heads"], r["B"], r["S"]) for r in rows] == [("fw", "1,16,16", 1, 64), ("fwbw", "1,16,16", 1, 64)]
    assert set(rows[0]["err"]) == {"h"} and set(rows[1]["err"]) == {"dq", "dk", "dv", "di", "df"}
    for row in rows:
        assert row["ms"] > 0 and not row["nan"] and not row["check_failed"]
        for name, err in row["err"].items():
            assert err < 1e-5, (name, err)


def test_bench_decode_runs_at_a_tiny_shape(capsys, tmp_path):
    path = tmp_path / "decode.json"
    rc = cli.main(["bench-decode", "--heads", "1,16,16", "--batches", "2", "--steps", "3", "--reps", "1",
                   "--warmup", "0", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(path.read_text())
    assert result["shape"] == {"NH": 1, "DHQK": 16, "DHV": 16}
    (row,) = result["rows"]
    assert row["B"] == 2 and row["scan_steps"] == 3 and row["state_bytes"] == 2 * 2 * 1 * (16 * 16 + 16 + 1) * 4
    for key in ("pallas_step_us", "pallas_scan_us", "native_step_us", "native_scan_us"):
        assert row[key] > 0, key


def test_time_calls_rotates_inputs_and_blocks():
    """Compile call + warm-up, then reps x calls timed calls, each on the next argument set."""
    seen = []

    def fn(x):
        seen.append(int(x))
        return jnp.asarray(x) + 1

    t = timing.time_calls(fn, [(0,), (1,)], reps=3, warmup=2, calls_per_rep=2)
    assert seen == [0, 1, 0] + [1, 0, 1, 0, 1, 0]
    assert len(t.samples_s) == 3 and t.min_s <= t.median_s and t.median_ms == pytest.approx(1e3 * t.median_s)
    with pytest.raises(ValueError, match="reps"):
        timing.time_calls(fn, [(0,)], reps=0)
    with pytest.raises(ValueError, match="arg_sets"):
        timing.time_calls(fn, [], reps=1)
    assert jax.block_until_ready(fn(0)) == 1
