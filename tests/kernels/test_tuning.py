"""Autotuning of the Pallas chunkwise kernels (issue 9): tuning tables, lookup, the tuner, the CLI.

Everything runs on CPU: the tables and the lookup are pure Python; the kernel runs in interpret
mode at tiny shapes; the tuner's smoke run is ``xlstm-jax tune --interpret`` at S = 32 with a
two-value space. The device kind of a GPU is faked by monkeypatching ``tuning.current_device_kind``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from xlstm_jax.cli import main
from xlstm_jax.kernels.mlstm_chunkwise.pallas import autodiff, chunkwise_kernel_params, mlstm_chunkwise_pallas, tuning
from xlstm_jax.kernels.mlstm_parallel.native import mlstm_parallel
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend
from xlstm_jax.testing import assert_close, mlstm_inputs, to_float64

H200 = "NVIDIA H200"


@pytest.fixture
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def entry(params, *, S=2048, B=8, NH=16, DHQK=128, DHV=256, dtype="bfloat16", grad_mode="exact", kind=H200):
    return dict(device_kind=kind, NH=NH, DHQK=DHQK, DHV=DHV, dtype=dtype, grad_mode=grad_mode, B=B, S=S,
                objective="fwbw", params=params)


def write(path, entries):
    path.write_text(json.dumps({"format": tuning.FORMAT, "entries": entries}))
    return str(path)


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """An empty user cache and an empty shipped table in tmp_path; returns (user, shipped) paths."""
    user, shipped = tmp_path / "user.json", tmp_path / "shipped.json"
    monkeypatch.setenv(tuning.ENV_CACHE, str(user))
    monkeypatch.delenv(tuning.ENV_SWITCH, raising=False)
    monkeypatch.setattr(tuning, "SHIPPED", str(shipped))
    return user, shipped


def resolve(S=2048, B=8, NH=16, DHQK=128, DHV=256, dtype=jnp.bfloat16, grad_mode="exact", kind=H200, **kw):
    kw.setdefault("tile_params", {})
    kw.setdefault("chunk_size", None)
    return tuning.resolve_kernel_params(B=B, NH=NH, S=S, DHQK=DHQK, DHV=DHV, dtype=dtype,
                                        grad_mode=grad_mode, device_kind=kind, **kw)


def test_lookup_order_explicit_user_shipped_heuristics(tables):
    user, shipped = tables
    heur = chunkwise_kernel_params(S=2048, DHQK=128, DHV=256, dtype=jnp.bfloat16)
    assert resolve().source == "heuristics" and resolve().params == heur
    write(shipped, [entry({"siz_b_L_loop": 32, "recompute_states_in_bw": False})])
    r = resolve()
    assert (r.source, r.params.siz_b_L_loop, r.call_options) == (str(shipped), 32, {"recompute_states_in_bw": False})
    write(user, [entry({"siz_b_L_loop": 128})])
    r = resolve()
    assert (r.source, r.params.siz_b_L_loop, r.call_options["recompute_states_in_bw"]) == (str(user), 128, True)
    # explicit arguments win over the tables, for tile parameters, the chunk and call options
    r = resolve(tile_params={"siz_b_L_loop": 16}, call_options={"recompute_states_in_bw": False})
    assert (r.params.siz_b_L_loop, r.call_options["recompute_states_in_bw"]) == (16, False)
    write(user, [entry({"chunk_size_intra": 256})])
    assert resolve().params.chunk_size_intra == 256
    assert resolve(chunk_size=64).params.chunk_size_intra == 64
    # switched off: heuristics
    assert resolve(tuned=False).params == heur
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tuning.ENV_SWITCH, "off")
        assert resolve().source == "heuristics"
    with pytest.raises(ValueError, match="tuned"):
        resolve(tuned="yes")


def test_nearest_shape_and_device_mismatch(tables):
    user, _ = tables
    write(user, [entry({"siz_b_L_loop": 16}, S=2048, B=32), entry({"siz_b_L_loop": 32}, S=8192, B=8),
                 entry({"siz_b_L_loop": 128}, S=32768, B=2), entry({"siz_b_L_loop": 16}, S=8192, B=1),
                 entry({"siz_b_L_loop": 32}, S=8192, DHQK=256, DHV=512, NH=8)])

    def loop(**kw):
        return resolve(**kw).params.siz_b_L_loop

    assert loop(S=6000, B=8) == 32  # nearest S in log scale, then nearest B * NH
    assert loop(S=8192, B=2) == 16
    assert loop(S=2500, B=4) == 16 and loop(S=20000, B=2) == 128
    assert resolve(S=200_000, B=1).source == "heuristics"  # more than a factor 4 from every entry
    assert resolve(S=2048, B=8, grad_mode="tfla").source == str(user)  # the other grad mode, if nothing else
    heur = chunkwise_kernel_params(S=8192, DHQK=128, DHV=256, dtype=jnp.bfloat16)
    for kw in (dict(kind="NVIDIA H100 80GB HBM3"), dict(kind="cpu"), dict(dtype=jnp.float16),
               dict(DHQK=64, DHV=128)):
        r = resolve(S=8192, **kw)
        assert r.source == "heuristics"
        if "DHQK" not in kw and "dtype" not in kw:
            assert r.params == heur


def test_invalid_tables_are_ignored_with_a_warning(tables, tmp_path):
    user, shipped = tables
    user.write_text("{not json")
    write(shipped, [entry({"siz_b_L_loop": 32})])
    with pytest.warns(UserWarning, match="not valid JSON"):
        r = resolve()
    assert r.source == str(shipped)  # the broken user cache is skipped, the shipped table still used
    with pytest.raises(ValueError, match="not valid JSON"):
        tuning.write_table(str(user), [entry({})])
    write(user, [entry({"no_such_option": 1}), entry({"siz_b_L_loop": "big"}), {"S": 1},
                 entry({"recompute_states_in_bw": "no"}), entry({"siz_b_L_loop": 128}, S=8192)])
    with pytest.warns(UserWarning) as rec:
        r = resolve(S=8192)
    texts = [str(w.message) for w in rec]
    assert any("entry 0 skipped" in t and "no_such_option" in t for t in texts)
    for n in (1, 2, 3):
        assert any(f"entry {n} skipped" in t for t in texts), (n, texts)
    assert r.params.siz_b_L_loop == 128
    # an entry whose values do not work for the call: warning, heuristics
    write(user, [entry({"num_warps_intra": 3})])
    with pytest.warns(UserWarning, match="not usable"):
        r = resolve()
    assert r.source == "heuristics"
    with pytest.raises(ValueError, match="siz_b_L_loop"):  # an invalid explicit value is the caller's error
        resolve(tile_params={"siz_b_L_loop": 24})
    # the shipped table of the package is a valid (possibly empty) table
    with open(tuning.__file__.replace("tuning.py", "tuned_defaults.json")) as fh:
        assert isinstance(tuning.parse_table(fh.read(), "tuned_defaults.json"), list)


def test_write_table_merges_by_key(tmp_path):
    path = tmp_path / "sub" / "t.json"
    key = tuning.TuningKey(H200, 16, 128, 256, "bfloat16", "exact", 8, 8192)
    e1 = tuning.make_entry(key, {"siz_b_L_loop": 32}, objective="fwbw", ms={"fwbw": 1.0})
    e2 = tuning.make_entry(tuning.TuningKey(H200, 16, 128, 256, "bfloat16", "tfla", 8, 8192), {}, objective="fwbw")
    tuning.write_table(str(path), [e1, e2])
    e1b = tuning.make_entry(key, {"siz_b_L_loop": 128}, objective="fwbw")
    table = tuning.write_table(str(path), [e1b])
    got = tuning.read_table(str(path))
    assert [e["grad_mode"] for e in got] == ["tfla", "exact"] and len(table) == 2
    assert got[1]["params"] == {"siz_b_L_loop": 128}


def test_tuned_params_reach_the_kernel(tables, monkeypatch, x64):
    user, _ = tables
    monkeypatch.setattr(tuning, "current_device_kind", lambda: H200)
    write(user, [entry({"chunk_size_intra": 16, "siz_b_L_loop": 16, "recompute_states_in_bw": False},
                       S=32, B=1, NH=2, DHQK=16, DHV=32, dtype="float32")])
    seen = []
    real = autodiff.core_config

    def spy(prep, **kw):
        cfg = real(prep, **kw)
        seen.append(cfg)
        return cfg

    monkeypatch.setattr(autodiff, "core_config", spy)
    q, k, v, i, f, *_ = mlstm_inputs(jax.random.PRNGKey(3), 1, 2, 32, 16, 32)

    def shapes_of(**kw):
        seen.clear()
        jax.eval_shape(lambda *a: mlstm_chunkwise_pallas(*a, **kw), q, k, v, i, f)  # traces, runs nothing
        return seen[-1]

    cfg = shapes_of()
    assert (cfg.params.chunk_size_intra, cfg.params.siz_b_L_loop, cfg.recompute_states_in_bw) == (16, 16, False)
    cfg = shapes_of(tuned=False)
    assert cfg.params == chunkwise_kernel_params(S=32, DHQK=16, DHV=32, dtype=jnp.float32)
    assert cfg.recompute_states_in_bw is True
    cfg = shapes_of(siz_b_L_loop=8 * 2, chunk_size=32, recompute_states_in_bw=True)
    assert (cfg.params.chunk_size_intra, cfg.recompute_states_in_bw) == (32, True)
    # the tuned configuration computes the cell (float64 reference; the gradients with kept states
    # are covered by tests/kernels/test_chunkwise_pallas.py)
    h = jax.jit(mlstm_chunkwise_pallas)(q, k, v, i, f)
    assert seen[-1].params.chunk_size_intra == 16
    assert_close(h, mlstm_parallel(*to_float64((q, k, v, i, f))), 2e-4, "h")


def test_search_space_pruning_and_descent():
    space = tuning.search_space(128, 16, 32, jnp.bfloat16)
    names = dict(space)
    assert "siz_b_DHQK_inter" not in names  # one value left at DHQK = 16: nothing to search
    assert names["chunk_size_intra"] == (64, 128) and names["recompute_states_in_bw"] == (True, False)
    assert tuning.prune_reason(2048, 128, 256, jnp.bfloat16, {"siz_b_L_loop": 24}).startswith("invalid")
    assert tuning.prune_reason(8192, 256, 512, jnp.bfloat16, {"num_stages_intra": 3}).startswith("shared memory")
    assert tuning.prune_reason(8192, 256, 512, jnp.bfloat16, {}) is None  # the (running) defaults pass

    calls = []
    clock = iter(range(1000))

    def measure(ov):
        calls.append(dict(ov))
        if ov.get("siz_b_L_loop") == 16:
            raise RuntimeError("out of shared memory")
        return 10.0 - (ov.get("siz_b_L_parallel") == 32) * 3.0 - (ov.get("recompute_states_in_bw") is False) * 1.0

    res = tuning.coordinate_descent(
        measure, S=64, DHQK=16, DHV=16, dtype=jnp.bfloat16, budget_s=100, log=lambda s: None,
        clock=lambda: float(next(clock)),
        space=[("siz_b_L_parallel", (16, 32, 64, 128)), ("siz_b_L_loop", (16, 24, 64)),
               ("recompute_states_in_bw", (True, False))])
    assert res.best == {"siz_b_L_parallel": 32, "recompute_states_in_bw": False}
    assert (res.default_ms, res.best_ms) == (10.0, 6.0)
    assert any(t.error and "shared memory" in t.error for t in res.trials)
    assert any(t.skipped and t.skipped.startswith("invalid") for t in res.trials)
    assert {"siz_b_L_parallel": 64} not in calls and {"siz_b_L_parallel": 128} not in calls  # = default (clamped)
    # a seed (the best of another shape) is tried first and becomes the start when it is faster
    calls.clear()
    res = tuning.coordinate_descent(measure, S=64, DHQK=16, DHV=16, dtype=jnp.bfloat16, budget_s=100,
                                    log=lambda s: None, seeds=[{"siz_b_L_parallel": 32}],
                                    space=[("siz_b_L_parallel", (16, 32))])
    assert calls[:2] == [{}, {"siz_b_L_parallel": 32}] and res.best == {"siz_b_L_parallel": 32}
    assert len(calls) == 3  # the seed is not measured twice
    # the budget stops the search (the default is always measured)
    res = tuning.coordinate_descent(measure, S=64, DHQK=16, DHV=16, dtype=jnp.bfloat16, budget_s=0.0,
                                    log=lambda s: None, space=[("siz_b_L_parallel", (16, 32))])
    assert res.budget_exhausted and res.best == {} and len(res.trials) == 1


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the refusal is for machines without a GPU")
def test_tune_cli_refuses_on_cpu_and_bad_cache(capsys, tmp_path):
    assert main(["tune", "--heads", "small"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["tune", "--interpret", "--cache", str(bad)]) == 2
    assert "--cache" in capsys.readouterr().err
    assert main(["tune", "--interpret", "--space", "siz_b_nope=1,2"]) == 2
    assert "unknown option" in capsys.readouterr().err
    assert main(["tune", "--interpret", "--exclude", "recompute"]) == 2
    assert "--exclude: unknown option 'recompute'" in capsys.readouterr().err


def test_tune_cli_interpret_smoke(tmp_path, capsys):
    out, cache = tmp_path / "out.json", tmp_path / "cache.json"
    # S = 64: the default siz_b_L_loop is 64, so 16 and 32 are the two candidates (compiled together)
    rc = main(["tune", "--interpret", "--heads", "1,16,16", "--shapes", "1,64", "--space", "siz_b_L_loop=16,32,64",
               "--objective", "fw", "--report-modes", "fw", "--reps", "1", "--warmup", "0",
               "--compile-threads", "2", "--cache", str(cache), "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "siz_b_L_loop=16:" in text and "siz_b_L_loop=32:" in text and "siz_b_L_loop=64:" not in text
    assert "tuned params" in text
    (e,) = tuning.parse_table(out.read_text(), str(out))
    assert (e["device_kind"], e["NH"], e["DHQK"], e["DHV"], e["B"], e["S"]) == (
        tuning.current_device_kind(), 1, 16, 16, 1, 64)
    assert e["objective"] == "fw" and set(e["params"]) <= {"siz_b_L_loop"} and e["ms"]["fw_default"] > 0
    assert tuning.read_table(str(cache)) == tuning.read_table(str(out))


def test_backend_chunk_rule():
    def call(seq_len, **kw):
        return create_mlstm_backend("triton_kernels", **kw).kernel_call(seq_len)[1]

    # chunk_size=None: the kernel's own rule (tuned / heuristics); the language model passes None
    assert call(256, chunk_size=None) == {"autocast_kernel_dtype": None}
    assert call(96, chunk_size=None)["chunk_size"] == 32  # reduce_slicing: 96 = 3 * 32, no padding
    none = dict(chunk_size=None)
    assert "chunk_size" not in call(96, reduce_slicing=False, **none) and "chunk_size" not in call(97, **none)
    # the seed config's documented default, 64, and any explicit chunk: intra = inter = that chunk
    for kw in ({}, {"chunk_size": 64}):
        explicit = call(256, **kw)
        assert (explicit["chunk_size_intra"], explicit["chunk_size_inter"]) == (64, 64)
    from xlstm_jax.models.xlstm_lm.config import xLSTMLMConfig

    assert xLSTMLMConfig(mlstm_backend="triton_kernels").backend_kwargs["chunk_size"] is None
    given = xLSTMLMConfig(mlstm_backend="triton_kernels", mlstm_backend_kwargs={"chunk_size": 128})
    assert given.backend_kwargs["chunk_size"] == 128
