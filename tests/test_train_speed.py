"""Training speed work: the FLOP count and MFU, the profile summariser, and the speed options
(fused projections, remat policies, weights cast once per step) computing the same loss and
gradients as the baseline (float64 references, tiny preset)."""

import functools
import gzip
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.models.xlstm_lm.config import preset_config
from xlstm_jax.models.xlstm_lm.model import cast_compute_params, init_params, xLSTMLMModel
from xlstm_jax.testing import assert_close, assert_trees_close, to_float64
from xlstm_jax.tools import trace_summary as ts
from xlstm_jax.train import flops

B, S = 2, 24


@pytest.fixture
def x64():
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


# ----------------------------------------------------------------------------------- FLOPs / MFU
def test_model_flops_hand_count():
    """The tiny preset (E 32, NH 2, DHQK 8, DHV 16, F 96, V 256, NB 2) counted by hand."""
    cfg = preset_config("tiny")
    assert (cfg.embedding_dim, cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim, cfg.ffn_dim) == (32, 2, 8, 16, 96)
    f = flops.model_flops(cfg, seq_len=32)  # chunk L = min(64, 32) = 32
    proj = 2 * 32 * (16 + 16 + 32 + 32 + 2 + 2) + 2 * 32 * 32  # q k v o i f, out
    ffn = 2 * 32 * 96 * 3
    cell = 2 * (2 * 32 * (8 + 16) + 4 * 8 * 16 + 4 * 8)
    head = 2 * 32 * 256
    assert f["projections"] == 2 * proj and f["ffn"] == 2 * ffn and f["cell"] == 2 * cell and f["head"] == head
    assert f["forward"] == 2 * (proj + ffn + cell) + head and f["train"] == 3 * f["forward"]
    # the chunk length enters the cell term only, capped by the sequence
    g = flops.model_flops(cfg.replace(mlstm_backend_kwargs={"chunk_size": 16}), seq_len=32)
    assert f["cell"] - g["cell"] == 2 * 2 * 2 * (32 - 16) * (8 + 16)
    assert flops.model_flops(cfg, 8)["cell"] == flops.model_flops(cfg, 8, chunk_size=64)["cell"] < f["cell"]
    # the matrix products are most of 6 x params at the 350m size
    big = preset_config("350m")
    ratio = flops.model_flops(big, 2048)["train"] / flops.six_n_flops_per_token(big)
    assert 0.95 < ratio < 1.1
    with pytest.raises(ValueError, match="seq_len"):
        flops.model_flops(cfg, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        flops.model_flops(cfg, 8, chunk_size=0)


def test_peak_table_and_mfu():
    dev = lambda kind, platform="gpu": types.SimpleNamespace(device_kind=kind, platform=platform)  # noqa: E731
    assert flops.device_peak_tflops(dev("NVIDIA H200")) == 989.0
    assert flops.device_peak_tflops(dev("NVIDIA H100 80GB HBM3")) == 989.0
    assert flops.device_peak_tflops(dev("NVIDIA H100 PCIe")) == 756.0
    assert flops.device_peak_tflops(dev("NVIDIA A100-SXM4-80GB")) == 312.0
    assert flops.device_peak_tflops(dev("Some future GPU")) is None
    assert flops.device_peak_tflops(jax.devices("cpu")[0]) is None
    assert flops.mfu(1000.0, 2e9, 1.0) == pytest.approx(1000 * 2e9 / 1e12)
    assert flops.mfu(1000.0, 2e9, 1.0, num_devices=4) == pytest.approx(1000 * 2e9 / 4e12)
    assert flops.mfu(1000.0, 2e9, None) is None and flops.mfu(None, 2e9, 1.0) is None


# ----------------------------------------------------------------------------- trace summariser
def _write_trace(directory, events):
    run = os.path.join(directory, "plugins", "profile", "2026_01_01_00_00_00")
    os.makedirs(run)
    with gzip.open(os.path.join(run, "perfetto_trace.json.gz"), "wt") as fh:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, fh)


def test_trace_summary_on_synthetic_trace(tmp_path):
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 11, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    kernels = [  # (name, hlo_op, duration us, family)
        ("mlstm_chunkwise_parallel_fw", "custom-call.1", 1500.0, "mLSTM kernels"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", "custom-call.2", 1000.0, "matmul/gemm"),
        ("nvjet_tst_128x256", "fusion.9", 250.0, "matmul/gemm"),
        ("loop_fusion_3", "fusion.3", 300.0, "optimizer"),
        ("input_reduce_fusion", "fusion.7", 200.0, "norms"),
        ("loop_multiply_fusion", "fusion.8", 100.0, "element-wise fusions"),
        ("copy_transpose_kernel", "copy.4", 80.0, "copies/transposes"),
        ("ncclDevKernel_AllReduce_Sum_f32", "all-reduce.1", 60.0, "collectives"),
        ("mystery_kernel", "", 10.0, "other"),
        ("softmax_thing", "fusion.12", 40.0, "mLSTM kernels"),  # a scope under mlstm_cell
    ]
    hlo_text = "\n".join([
        'ENTRY %main {',
        '  %fusion.3 = f32[4]{0} fusion(f32[4]{0} %p), kind=kLoop, metadata={op_type="add" op_name="jit(_step)/optimizer/add"}',
        '  fusion.7 = f32[4]{0} fusion(f32[4]{0} %p), metadata={op_name="jit(_step)/blocks/norm_mlstm/reduce_sum"}',
        '  ROOT %fusion.12 = f32[4]{0} fusion(%p), metadata={op_name="jit(_step)/blocks/mlstm/mlstm_cell/exp"}',
        '}',
    ])
    scopes = ts.op_scopes_from_hlo(hlo_text)
    assert scopes == {
        "fusion.3": "jit(_step)/optimizer/add", "fusion.7": "jit(_step)/blocks/norm_mlstm/reduce_sum",
        "fusion.12": "jit(_step)/blocks/mlstm/mlstm_cell/exp",
    }
    events, ts_us = list(meta), 0.0
    steps = 2
    for _ in range(steps):
        for name, hlo_op, dur, _fam in kernels:
            events.append({"ph": "X", "pid": 1, "tid": 10, "ts": ts_us, "dur": dur, "name": name,
                           "args": {"hlo_op": hlo_op, "hlo_module": "jit__step"}})
            # the same op on the XLA Ops line and a host event: both must be ignored
            events.append({"ph": "X", "pid": 1, "tid": 11, "ts": ts_us, "dur": dur, "name": hlo_op or name})
            events.append({"ph": "X", "pid": 2, "tid": 5, "ts": ts_us, "dur": dur, "name": "host " + name,
                           "args": {"hlo_op": hlo_op}})
            ts_us += dur + 1.0
    events.append({"ph": "X", "pid": 1, "tid": 10, "ts": ts_us, "name": "no duration"})
    _write_trace(str(tmp_path), events)
    out = ts.summarise_dir(str(tmp_path), steps, hlo_text=hlo_text, step_ms=4.0)
    want: dict[str, float] = {}
    for _name, _op, dur, fam in kernels:
        want[fam] = want.get(fam, 0.0) + dur / 1e3
    total = sum(want.values())
    got = {r["family"]: r for r in out["families"]}
    assert set(got) == set(ts.FAMILY_ORDER)
    for fam in ts.FAMILY_ORDER:
        assert got[fam]["ms_per_step"] == pytest.approx(want.get(fam, 0.0)), fam
        assert got[fam]["share"] == pytest.approx(want.get(fam, 0.0) / total), fam
    assert out["busy_ms_per_step"] == pytest.approx(total)
    assert out["idle_share"] == pytest.approx(1 - total / 4.0)
    assert out["top_kernels"][0]["kernel"] == "mlstm_chunkwise_parallel_fw"
    table = ts.format_table(out)
    assert "mLSTM kernels" in table and "device busy" in table
    with pytest.raises(FileNotFoundError, match="no trace file"):
        ts.find_trace_file(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="steps"):
        ts.summarise([], 0)


def test_trace_summary_on_real_cpu_trace(tmp_path):
    """A jax.profiler trace of a CPU run: the XLA ops (host thunks with hlo_op) are found, the ops
    of a while loop counted once (leaves only), the matrix product classified by name."""
    x = jnp.ones((64, 64), jnp.float32)

    def f(x):
        with jax.named_scope("optimizer"):
            y = jax.lax.fori_loop(0, 3, lambda i, a: jnp.tanh(a @ x), x)
        return y.sum()

    fn = jax.jit(f)
    hlo = fn.lower(x).compile().as_text()
    fn(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(2):
            fn(x).block_until_ready()
    out = ts.summarise_dir(str(tmp_path), 2, hlo_text=hlo)
    assert out["busy_ms_per_step"] > 0
    fams = {r["family"]: r for r in out["families"]}
    assert fams["matmul/gemm"]["ms_per_step"] > 0 or fams["optimizer"]["ms_per_step"] > 0
    # leaves only: no event contains another, so nothing exceeds the traced wall time
    evs = ts.device_events(ts.load_trace(ts.find_trace_file(str(tmp_path))))
    assert evs and all(e.dur_us >= 0 for e in evs)


# ------------------------------------------------------------------------------ speed options
def _config(dtype="float32", **kw):
    # the quadratic parallel backend: the cheapest to compile (the options act outside the cell)
    return preset_config(
        "tiny", mlstm_backend="parallel_stabilized", dtype=dtype, param_dtype=dtype, context_length=64, **kw,
    )


def _init(cfg, seed):
    return jax.jit(lambda k: init_params(cfg, k))(jax.random.key(seed))


def _loss_and_grads(cfg, params, tokens, cast=False):
    model = xLSTMLMModel(cfg)

    def loss_fn(p):
        if cast:
            p = cast_compute_params(p, cfg)
        logits = model.apply({"params": p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32 if logits.dtype != jnp.float64 else logits.dtype), -1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_fused_projections_keep_the_parameter_tree():
    """Same parameter names, shapes and initial values with and without fused projections (the HF
    mapping and checkpoints see no difference)."""
    a = _init(_config(), 5)
    b = _init(_config(fused_projections=True), 5)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and bool(jnp.all(x == y))
    c = jax.eval_shape(lambda: init_params(_config(use_bias=True, fused_projections=True), jax.random.key(5)))
    assert set(c["blocks"]["mlstm"]["q"]) == {"kernel", "bias"}


@functools.lru_cache(maxsize=1)
def _baselines():
    """(tokens, float32 params, float64 loss and grads, float32 baseline loss and grads) of the tiny
    preset with biases (non-zero, so that their paths count), options off; under ``x64``."""
    assert jax.config.jax_enable_x64, "call under the x64 fixture"
    tokens = jax.random.randint(jax.random.key(1), (B, S + 1), 0, 256, dtype=jnp.int32)
    params64 = to_float64(_init(_config(use_bias=True), 2))
    params64 = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if str(getattr(p[-1], "key", "")) == "bias" else x, params64
    )
    loss64, grads64 = _loss_and_grads(_config("float64", use_bias=True), params64, tokens)
    params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params64)
    loss_base, grads_base = _loss_and_grads(_config(use_bias=True), params32, tokens)
    return jax.device_get((tokens, params32, loss64, grads64, loss_base, grads_base))


@pytest.mark.parametrize(
    "options",
    # "fused" alone is slow-marked: "fused-remat-dots" covers it (a wrong fused product fails both)
    [pytest.param(dict(fused_projections=True), marks=pytest.mark.slow), dict(remat=True, remat_policy="full"),
     dict(fused_projections=True, remat=True, remat_policy="dots")],
    ids=["fused", "remat-full", "fused-remat-dots"],
)
def test_speed_options_same_loss_and_gradients(options, x64):
    """Loss and every gradient with the option on match the float64 baseline (options off) as
    tightly as the float32 baseline does, and the float32 baseline itself."""
    tokens, params32, loss64, grads64, loss_base, grads_base = _baselines()
    loss, grads = _loss_and_grads(_config(use_bias=True, **options), params32, jnp.asarray(tokens))
    assert_close(loss_base, loss64, 1e-5, "float32 baseline loss")
    assert_close(loss, loss64, 1e-5, "loss")
    assert_trees_close(grads, grads64, 5e-5, "grads")
    assert_close(loss, loss_base, 1e-5, "loss vs float32 baseline")
    assert_trees_close(grads, grads_base, 5e-5, "grads vs float32 baseline")


def test_cast_params_once_same_loss_and_gradients():
    """bfloat16 compute: casting the weights once before the forward gives the loss and gradients
    of casting at every use (the same roundings happen), and keeps the gates and embedding."""
    cfg = _config("bfloat16").replace(param_dtype="float32")
    params = _init(cfg, 7)
    cast = cast_compute_params(params, cfg)
    assert cast["blocks"]["mlstm"]["q"]["kernel"].dtype == jnp.bfloat16
    assert cast["blocks"]["ffn"]["up"]["kernel"].dtype == jnp.bfloat16
    assert cast["blocks"]["mlstm"]["igate"]["kernel"].dtype == jnp.float32
    assert cast["embedding"]["embedding"].dtype == jnp.float32
    tokens = jax.random.randint(jax.random.key(8), (B, S + 1), 0, 256, dtype=jnp.int32)
    loss_a, grads_a = _loss_and_grads(cfg, params, tokens)
    loss_b, grads_b = _loss_and_grads(cfg, params, tokens, cast=True)
    assert jax.tree.map(lambda g: g.dtype, grads_b) == jax.tree.map(lambda g: g.dtype, grads_a)
    assert_close(loss_b, loss_a, 1e-6, "loss")
    assert_trees_close(grads_b, grads_a, 1e-5, "grads")
    f32 = _config()  # float32 compute: nothing to cast
    assert cast_compute_params(params, f32) is params


def test_unroll_blocks_same_loss_and_gradients(x64):
    """TrainConfig.unroll_blocks (the blocks as a Python loop over slices of the stacked parameters)
    gives the scan's training loss and every gradient (stacked like the parameters), in float64
    with packed documents."""
    from xlstm_jax.train.config import TrainConfig
    from xlstm_jax.train.trainer import Trainer

    cfg = _config("float64", use_bias=True)
    params = to_float64(_init(_config(use_bias=True), 13))
    tokens = jax.random.randint(jax.random.key(11), (B, S + 1), 0, 256, dtype=jnp.int32)
    seg = jnp.cumsum(jax.random.bernoulli(jax.random.key(12), 0.1, (B, S + 1)), axis=1).astype(jnp.int32)
    batch = jnp.stack([tokens, seg], axis=1)  # (B, 2, S + 1) packed
    out = {}
    for unroll in (False, True):
        tc = TrainConfig(out_dir="", steps=3, batch_size=B, seq_len=S, checkpoints=False, eval_every=0,
                         eval_batches=0, unroll_blocks=unroll)
        trainer = Trainer(cfg, tc)
        out[unroll] = jax.device_get(jax.jit(jax.value_and_grad(trainer._loss))(params, batch, jax.random.key(0)))
    (la, ga), (lb, gb) = out[False], out[True]
    assert jax.tree.structure(gb) == jax.tree.structure(ga) and "blocks" in gb
    assert_close(lb, la, 1e-12, "loss")
    # 1e-9 as the sharding equality test: the forget-gate gradient is a sum with cancellation, and
    # XLA orders its float64 sums differently in the loop and in the scan (measured ~4e-11)
    assert_trees_close(gb, ga, 1e-9, "grads")


def test_residual_in_compute_dtype(x64):
    """The residual stream in bfloat16 (an option that changes rounding): the stream's dtype is the
    compute dtype, and the loss and gradients stay as close to the float64 reference as bfloat16
    compute allows (within 4x the error of the default float32 stream, and 2e-2 / 1e-1 absolute
    bounds on the relative errors); with float32 compute the stream stays float32."""
    from xlstm_jax.models.xlstm_lm.model import residual_dtype
    from xlstm_jax.testing import relative_error

    tokens, params32, loss64, grads64, _lb, _gb = _baselines()
    tokens = jnp.asarray(tokens)
    bf = _config("bfloat16", use_bias=True).replace(param_dtype="float32")
    assert residual_dtype(bf) == jnp.float32
    assert residual_dtype(bf.replace(residual_in_compute_dtype=True)) == jnp.bfloat16
    errs = {}
    for on in (False, True):
        loss, grads = _loss_and_grads(bf.replace(residual_in_compute_dtype=on), params32, tokens)
        g_err = max(relative_error(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads64)))
        errs[on] = (relative_error(loss, loss64), g_err)
    assert errs[True][0] < 2e-2 and errs[True][1] < 1e-1, errs
    assert errs[True][0] <= 4 * errs[False][0] + 1e-3 and errs[True][1] <= 4 * errs[False][1], errs
    print("relative errors vs float64 (loss, worst gradient): float32 stream", errs[False], "bfloat16 stream", errs[True])


def test_option_validation():
    with pytest.raises(ValueError, match="remat_policy"):
        _config(remat_policy="some")
    with pytest.raises(ValueError, match="fused_projections"):
        _config(fused_projections=1)
    with pytest.raises(ValueError, match="residual_in_compute_dtype"):
        _config(residual_in_compute_dtype="yes")
    from xlstm_jax.train.config import TrainConfig

    with pytest.raises(ValueError, match="cast_params"):
        TrainConfig(cast_params="yes")
    with pytest.raises(ValueError, match="unroll_blocks"):
        TrainConfig(unroll_blocks=1)
    cfg = preset_config("1.3b")
    assert 1.25e9 < cfg.num_params() < 1.4e9
    assert (cfg.qk_head_dim, cfg.v_head_dim) == (preset_config("7b").qk_head_dim, preset_config("7b").v_head_dim)


# --------------------------------------------------------------------------------- bench-train
def test_bench_train_cli_tiny(tmp_path, capsys):
    """bench-train on the tiny preset: the JSON has the figures, the losses, the profile table."""
    from xlstm_jax.cli import main

    out = tmp_path / "b.json"
    rc = main(["bench-train", "--preset", "tiny", "--backend", "parallel_stabilized", "--batch-size", "2",
               "--steps", "2", "--warmup", "0",
               "--loss-steps", "2", "--fused-projections", "--remat", "dots", "--cast-params",
               "--profile", str(tmp_path / "prof"), "--profile-steps", "1", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["fused_projections"] and r["remat"] == "dots" and r["cast_params"] and not r["unroll_blocks"]
    hlo = [f for f in os.listdir(tmp_path / "prof") if f.startswith("module.hlo.txt")]
    assert hlo and r["profile"]["hlo_source"] == "given"
    again = ts.summarise_dir(str(tmp_path / "prof"), 1)  # offline, later: the scopes from the file
    assert again["hlo_source"].endswith(hlo[0]) and again["busy_ms_per_step"] > 0
    assert len(r["losses"]) == 2 and all(np.isfinite(r["losses"]))
    assert r["tokens_per_s"] > 0 and r["mfu"] is None  # no peak rate on a CPU
    assert r["model_flops_per_token"]["train"] == flops.model_flops(preset_config("tiny"), 32)["train"]
    assert r["profile"]["busy_ms_per_step"] > 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "op family" in text
    assert main(["bench-train", "--preset", "tiny", "--seq-len", "999"]) == 2


def test_compare_loss_curves():
    """The seed-to-seed spread and the old-vs-new difference on smoothed curves, by hand."""
    from xlstm_jax.tools.bench_train import _smooth, compare_loss_curves, format_loss_comparison

    assert _smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    rng = np.random.default_rng(0)
    base = list(np.linspace(5.0, 2.0, 60))
    noisy = lambda shift: [b + shift + 0.01 * rng.standard_normal() for b in base]  # noqa: E731
    curves = {"old": {0: noisy(0.0), 1: noisy(0.1)}, "new": {0: noisy(0.02), 1: noisy(0.12)}}
    c = compare_loss_curves(curves, window=5, skip=5)
    sm = {k: {sd: _smooth(v, 5)[5:] for sd, v in r.items()} for k, r in curves.items()}
    want_noise = max(abs(a - b) for a, b in zip(sm["old"][0], sm["old"][1]))
    want_diff = max(abs(a - b) for a, b in zip(sm["old"][1], sm["new"][1]))
    assert c["noise"]["old"] == pytest.approx(want_noise) and c["diff"][1] == pytest.approx(want_diff)
    assert 0.05 < c["noise"]["new"] < 0.15 and c["diff"][0] < 0.06 and c["within_noise"]
    assert c["tail_mean"]["old"][0] == pytest.approx(np.mean(curves["old"][0][-50:]))
    shifted = {"old": curves["old"], "new": {sd: [x + 0.5 for x in v] for sd, v in curves["new"].items()}}
    assert not compare_loss_curves(shifted, window=5, skip=5)["within_noise"]
    assert "NOT within" in format_loss_comparison(compare_loss_curves(shifted, window=5, skip=5))
    with pytest.raises(ValueError, match="seeds"):
        compare_loss_curves({"old": {0: base}, "new": {0: base}})
    with pytest.raises(ValueError, match="length"):
        compare_loss_curves({"old": {0: base, 1: base[:-1]}, "new": {0: base, 1: base}})


def test_progress_text_shows_mfu():
    from xlstm_jax.train.run import progress_text

    assert progress_text(2.5, None, 1234.0, 0.256) == "loss 2.500  1,234 tok/s  MFU 25.6%"
    assert progress_text(2.5, None, 1234.0) == "loss 2.500  1,234 tok/s"  # no peak known: no MFU


# ------------------------------------------------- trace summariser: overlaps, names, HLO sources
_GPU_META = [
    {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
]


def _kernel(name, ts_us, dur, hlo_op="command_buffer_3"):
    return {"ph": "X", "pid": 1, "tid": 10, "ts": ts_us, "dur": dur, "name": name,
            "args": {"hlo_op": hlo_op, "hlo_module": "jit__step"}}


def test_trace_summary_partial_overlap_counts_both_kernels():
    """Consecutive kernels that overlap by 0.2 us in the trace clock are both leaves; an event that
    lies inside another (a CPU while loop around its ops) is the one kept, its parent dropped."""
    evs = _GPU_META + [
        _kernel("gemm_a", 0.0, 10.0),
        _kernel("loop_add_fusion", 9.8, 5.0),  # starts 0.2 us before gemm_a ends
        _kernel("parent_loop", 20.0, 10.0),
        _kernel("child_op", 22.0, 3.0),  # inside parent_loop
    ]
    got = sorted((e.name, e.dur_us) for e in ts.device_events(evs))
    assert got == [("child_op", 3.0), ("gemm_a", 10.0), ("loop_add_fusion", 5.0)]


_HLO_WITH_FUSIONS = "\n".join([
    "HloModule jit__step",
    "%fused_computation.7 (param_0: f32[8]) -> f32[8] {",
    '  %param_0 = f32[8]{0} parameter(0)',
    '  %mul.1 = f32[8]{0} multiply(%param_0, %param_0), metadata={op_name="jit(_step)/blocks/norm_ffn/mul"}',
    '  %mul.2 = f32[8]{0} multiply(%mul.1, %param_0), metadata={op_name="jit(_step)/blocks/norm_ffn/mul"}',
    '  %dus.1 = f32[8]{0} dynamic-update-slice(%mul.2, %param_0), metadata={op_name="jit(_step)/dynamic_update_slice"}',
    '  %dus.2 = f32[8]{0} dynamic-update-slice(%dus.1, %param_0), metadata={op_name="jit(_step)/dynamic_update_slice"}',
    '  %dus.3 = f32[8]{0} dynamic-update-slice(%dus.2, %param_0), metadata={op_name="jit(_step)/dynamic_update_slice"}',
    '  ROOT %add.3 = f32[8]{0} add(%dus.3, %param_0), metadata={op_name="jit(_step)/blocks/add"}',
    "}",
    "ENTRY %main.9 (p: f32[8]) -> f32[8] {",
    '  %p = f32[8]{0} parameter(0)',
    '  %input_multiply_reduce_fusion.2 = f32[8]{0} fusion(%p), kind=kInput, calls=%fused_computation.7, '
    'metadata={op_name="jit(_step)/blocks/add"}',
    '  ROOT %loop-broadcast.4 = f32[3,8]{1,0} broadcast(%p), metadata={op_name="jit(_step)/broadcast_in_dim"}',
    "}",
])


def test_trace_summary_scopes_through_kernel_names_and_fused_computations():
    """Under command buffers (hlo_op = command_buffer_N) a kernel finds its instruction by its name
    ('.' and '-' as '_'); a fusion's scope is the op_name most of its fused instructions carry,
    storage ops (dynamic-update-slice) not voting; parts split the families by scope."""
    modules = ts.hlo_instructions_from_text(_HLO_WITH_FUSIONS)
    comps = modules[""]
    assert [i.name for i in comps["main.9"]] == ["p", "input_multiply_reduce_fusion.2", "loop-broadcast.4"]
    assert comps["main.9"][1].calls == ("fused_computation.7",) and comps["main.9"][1].opcode == "fusion"
    scopes = ts.instruction_scopes(modules)
    assert scopes["input_multiply_reduce_fusion.2"] == "jit(_step)/blocks/norm_ffn/mul"
    assert scopes["loop-broadcast.4"] == "jit(_step)/broadcast_in_dim"
    evs = _GPU_META + [
        _kernel("input_multiply_reduce_fusion_2", 0.0, 4.0),
        _kernel("loop_broadcast_4", 5.0, 2.0),
        _kernel("nvjet_sm90_tst_128x128", 8.0, 6.0),
        _kernel("mlstm_chunkwise_parallel_fw", 15.0, 3.0),
        _kernel("memcpy128", 19.0, 1.0),
    ]
    dev = ts.device_events(evs, scopes)
    assert {e.name: e.scope for e in dev}["loop_broadcast_4"] == "jit(_step)/broadcast_in_dim"
    out = ts.summarise(dev, steps=1)
    parts = {r["part"]: r["ms_per_step"] for r in out["parts"]}
    assert parts == pytest.approx({
        "norms (RMS, multi-head)": 0.004, "layer scan (stacked buffers: zero init, slices)": 0.002,
        "gemm (no scope: command buffers)": 0.006, "mLSTM kernels (Pallas/Triton)": 0.003,
        "copies without scope (memcpy, memset)": 0.001,
    })
    assert sum(r["share"] for r in out["parts"]) == pytest.approx(1.0)
    assert "part of the step" in ts.format_table(out)
    part = lambda scope: ts.classify_part(ts.DeviceEvent("loop_fusion", "", scope, 1.0))  # noqa: E731
    assert part("jit(_step)/jvp(loss)/sub") == part("jit(_step)/jvp(xLSTMLMModel)/tanh") == "loss / LM head element-wise"
    assert part("jit(_step)/transpose(jvp(xLSTMLMModel))/blocks_3/add_any") == "residual stream (adds, casts)"
    assert part("jit(_step)/transpose(jvp())/concatenate").startswith("block parameters")
    assert part("jit(_step)/jvp(xLSTMLMModel)/blocks_3/ffn/mul").startswith("feed-forward")
    big = [ts.DeviceEvent(e.name, e.hlo_op, e.scope, e.dur_us * 1000) for e in dev]  # ms-sized
    before, after = ts.summarise(big, steps=1), ts.summarise(big[:3], steps=1)  # after: no kernel, no memcpy
    text = ts.format_comparison(before, after, ("old", "new"))
    assert "| mLSTM kernels (Pallas/Triton) | 3.00 | 18.8% | 0.00 | 0.0% | -3.00 |" in text
    assert "| norms (RMS, multi-head) | 4.00 | 25.0% | 4.00 | 33.3% | +0.00 |" in text
    assert "device busy: old 16.0 ms, new 12.0 ms" in text


def _pb_varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(field, value):
    """One protobuf field: an int (varint) or bytes/str (length-delimited)."""
    if isinstance(value, int):
        return _pb_varint(field << 3) + _pb_varint(value)
    value = value.encode() if isinstance(value, str) else value
    return _pb_varint((field << 3) | 2) + _pb_varint(len(value)) + value


def test_hlo_from_xplane_reads_the_hlo_proto(tmp_path):
    """An .xplane.pb built by hand in the layout jax.profiler writes (XSpace > /host:metadata plane >
    event metadata > stat 'Hlo Proto' > HloProto > module > computations > instructions) gives back
    the instructions, their shapes, op_names and fused computations; summarise_dir uses it when no
    HLO text is there."""
    def instr(name, opcode, dims, op_name, calls=(), element=11):
        shape = _pb(2, element) + b"".join(_pb(3, d) for d in dims)
        meta = _pb(2, op_name) if op_name else b""
        return _pb(1, name) + _pb(2, opcode) + _pb(3, shape) + _pb(7, meta) + b"".join(_pb(38, c) for c in calls)

    fused = _pb(1, "fused_computation.3") + _pb(5, 7) + _pb(2, instr("mul.1", "multiply", [4, 8], "jit(_step)/optimizer/mul"))
    entry = (_pb(1, "main.2") + _pb(5, 8)
             + _pb(2, instr("loop_multiply_fusion.3", "fusion", [4, 8], "jit(_step)/x", calls=(7,), element=16)))
    module = _pb(1, "jit__step") + _pb(3, fused) + _pb(3, entry)
    hlo_proto = _pb(1, module)
    stat = _pb(1, 9) + _pb(6, hlo_proto)
    event_meta = _pb(1, 2) + _pb(2, "jit__step(77)") + _pb(5, stat)
    plane = _pb(1, 1) + _pb(2, "/host:metadata") + _pb(4, _pb(1, 2) + _pb(2, event_meta))
    other = _pb(2, "/device:GPU:0")
    space = _pb(1, plane) + _pb(1, other)
    run = tmp_path / "plugins" / "profile" / "r"
    run.mkdir(parents=True)
    (run / "vm.xplane.pb").write_bytes(space)
    mods = ts.hlo_from_xplane(str(run / "vm.xplane.pb"), "jit__step")
    assert list(mods) == ["jit__step(77)"]
    comps = mods["jit__step(77)"]
    fusion = comps["main.2"][0]
    assert (fusion.name, fusion.opcode, fusion.shape, fusion.calls) == (
        "loop_multiply_fusion.3", "fusion", "bf16[4,8]", ("fused_computation.3",))
    assert comps["fused_computation.3"][0].op_name == "jit(_step)/optimizer/mul"
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as fh:
        json.dump({"traceEvents": _GPU_META + [_kernel("loop_multiply_fusion_3", 0.0, 5.0)]}, fh)
    out = ts.summarise_dir(str(tmp_path), 1)
    assert out["hlo_source"].endswith("vm.xplane.pb")
    assert {r["family"]: r["ms_per_step"] for r in out["families"]}["optimizer"] == pytest.approx(0.005)
    # a module.hlo.txt beside the trace is preferred (bench-train --profile writes it)
    path = ts.write_hlo_text(str(tmp_path), _HLO_WITH_FUSIONS.replace("input_multiply_reduce_fusion.2", "loop_multiply_fusion.3"), gzip_above=10)
    assert path.endswith("module.hlo.txt.gz")
    out = ts.summarise_dir(str(tmp_path), 1)
    assert out["hlo_source"] == path
    assert {r["family"]: r["ms_per_step"] for r in out["families"]}["norms"] == pytest.approx(0.005)
