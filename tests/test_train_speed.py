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
    [dict(fused_projections=True), dict(remat=True, remat_policy="full"),
     dict(fused_projections=True, remat=True, remat_policy="dots"),
     dict(scan_unroll=99, remat=True, remat_policy="dots")],
    ids=["fused", "remat-full", "fused-remat-dots", "unrolled-remat-dots"],
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


def test_option_validation():
    with pytest.raises(ValueError, match="remat_policy"):
        _config(remat_policy="some")
    with pytest.raises(ValueError, match="fused_projections"):
        _config(fused_projections=1)
    with pytest.raises(ValueError, match="scan_unroll"):
        _config(scan_unroll=0)
    from xlstm_jax.train.config import TrainConfig

    with pytest.raises(ValueError, match="cast_params"):
        TrainConfig(cast_params="yes")
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
    assert r["fused_projections"] and r["remat"] == "dots" and r["cast_params"]
    assert len(r["losses"]) == 2 and all(np.isfinite(r["losses"]))
    assert r["tokens_per_s"] > 0 and r["mfu"] is None  # no peak rate on a CPU
    assert r["model_flops_per_token"]["train"] == flops.model_flops(preset_config("tiny"), 32)["train"]
    assert r["profile"]["busy_ms_per_step"] > 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "op family" in text
    assert main(["bench-train", "--preset", "tiny", "--seq-len", "999"]) == 2


def test_progress_text_shows_mfu():
    from xlstm_jax.train.run import progress_text

    assert progress_text(2.5, None, 1234.0, 0.256) == "loss 2.500  1,234 tok/s  MFU 25.6%"
    assert progress_text(2.5, None, 1234.0) == "loss 2.500  1,234 tok/s"  # no peak known: no MFU
