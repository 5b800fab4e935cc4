"""Layers of the xLSTM language model: norms, the mLSTM layer, the gated feed-forward, the block.

Notation (see ``config.py``): x (B, S, E) residual stream; per layer q, k (B, NH, S, DHQK),
v (B, NH, S, DHV), gate pre-activations i, f (B, NH, S), hidden h (B, NH, S, DHV); the cell state
``MLSTMState(matC (B, NH, DHQK, DHV), vecN (B, NH, DHQK), scaM (B, NH))``.

The mLSTM layer (xLSTM-7B, as transformers' ``xLSTMLayer`` computes it):

    q, k, v  = W_q x, W_k x, W_v x                         (no up-projection)
    i, f     = softcap(W_i x + b_i), softcap(W_f x + b_f)  (one value per head, float32)
    h        = mLSTM cell(q, k, v, i, f)                   (backend or step kernel)
    y        = W_out (sigmoid(W_o x) * MultiHeadNorm(h))   (per-head layer norm, or RMS norm)

and a block is ``x + mLSTMLayer(RMSNorm(x))`` followed by ``x + SwiGLU(RMSNorm(x))``.

Two modes: ``"sequence"`` runs the cell over S tokens with the configured backend (training,
prompt prefill; optionally from and to a state), ``"step"`` runs one token (S = 1) through
``xlstm_jax.inference.decode_step`` with the configured step kernel from a given state (decoding).
In sequence mode an optional ``mask`` (B, S) marks the real tokens: at a masked-out position the
gates are set to ``xlstm_jax.inference.PASS_THROUGH_GATES`` (input gate closed, forget gate fully
open), so the cell state passes through unchanged and a right-padded row ends in exactly the state
of its real tokens. With a ``mesh`` the cell runs per device under ``jax.shard_map``: batch over
(data, fsdp), heads over tensor.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from xlstm_jax.inference import decode_step, mask_gates
from xlstm_jax.kernels import CellOptions, MLSTMState
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend

from .config import xLSTMLMConfig
from .sharding import BATCH_AXES, TENSOR

MODES = ("sequence", "step")


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)``: smooth clipping to (-cap, cap); identity if ``cap`` is None."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


def small_init(dim: int) -> nn.initializers.Initializer:
    """Normal init with std sqrt(2 / (5 * dim)) (the "small init" of xLSTM / GPT-NeoX)."""
    return nn.initializers.normal(stddev=(2.0 / (5.0 * dim)) ** 0.5)


def wang_init(dim: int, num_blocks: int) -> nn.initializers.Initializer:
    """Normal init with std 2 / (num_blocks * sqrt(dim)) for projections back into the residual."""
    return nn.initializers.normal(stddev=2.0 / (num_blocks * dim**0.5))


def linspace_init(low: float, high: float) -> nn.initializers.Initializer:
    """Bias init: values linearly spaced from ``low`` to ``high`` over the (only) dimension."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.linspace(low, high, shape[-1], dtype=dtype) * jnp.ones(shape, dtype)

    return init


def _float_dtype(dtype) -> jnp.dtype:
    """The dtype norms and gates compute in: float32, or float64 for float64 models."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def _reduction_dtype(dtype, force_float32: bool) -> jnp.dtype:
    """The dtype a norm reduces in: float32 or wider when forced, else ``dtype`` itself."""
    return _float_dtype(dtype) if force_float32 else jnp.dtype(dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned scale (and bias).

    As transformers' ``xLSTMRMSNorm``: ``x / sqrt(mean(x^2) + eps)`` reduced in float32 (or in
    ``dtype`` when ``force_float32`` is False), cast to ``dtype``, then ``* scale (+ bias)``.
    """

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    use_bias: bool = False
    force_float32: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (..., D) -> (..., D) in dtype
        D = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (D,), self.param_dtype)
        xf = x.astype(_reduction_dtype(self.dtype, self.force_float32))
        y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(self.dtype)
        y = y * scale.astype(self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (D,), self.param_dtype).astype(self.dtype)
        return y


class MultiHeadNorm(nn.Module):
    """Normalisation of each head of h separately, then one learned scale (and bias) per channel.

    ``kind="layernorm"`` (xLSTM-7B, transformers' ``xLSTMMultiHeadLayerNorm``):
    ``(h - mean(h)) / sqrt(var(h) + eps)`` over each head's DHV channels; ``kind="rms"``:
    ``h / sqrt(mean(h^2) + eps)``. Reduced in float32 unless ``force_float32`` is False.
    """

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kind: str = "layernorm"
    use_bias: bool = False
    force_float32: bool = True

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:  # (B, S, NH, DHV) -> (B, S, NH * DHV)
        B, S, NH, DHV = h.shape
        scale = self.param("scale", nn.initializers.ones, (NH * DHV,), self.param_dtype)
        hf = h.astype(_reduction_dtype(self.dtype, self.force_float32))
        if self.kind == "layernorm":
            mean = jnp.mean(hf, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(hf - mean), axis=-1, keepdims=True)
            y = (hf - mean) * jax.lax.rsqrt(var + self.eps)
        elif self.kind == "rms":
            y = hf * jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + self.eps)
        else:
            raise ValueError(f"MultiHeadNorm kind must be 'layernorm' or 'rms'; got {self.kind!r}")
        y = y.astype(self.dtype).reshape(B, S, NH * DHV) * scale.astype(self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (NH * DHV,), self.param_dtype).astype(self.dtype)
        return y


class DenseParams(nn.Module):
    """The parameters of an ``nn.Dense(features)`` (the same names, shapes, initialisers and
    initialisation RNG: ``kernel`` (D, features), then ``bias`` (features,) when ``use_bias``),
    returned instead of applied, so that several of them can be applied as one matrix product."""

    features: int
    use_bias: bool = False
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        return kernel, bias


def fused_dense(
    x: jax.Array, outputs: tuple[tuple[str, int], ...], *, use_bias: bool, dtype: Any, param_dtype: Any,
    kernel_init: nn.initializers.Initializer,
) -> list[jax.Array]:
    """Several ``nn.Dense`` layers of the same input as one matrix product (call inside a compact
    module): ``outputs`` lists (name, features); the parameters are those of ``nn.Dense(features,
    name=name)`` each (``DenseParams``), concatenated along the output axis at apply time, and the
    product (..., sum of features) is split back into one array per entry. Same function as the
    separate layers (up to the summation order of the product)."""
    parts = [
        DenseParams(n, use_bias=use_bias, param_dtype=param_dtype, kernel_init=kernel_init, name=name)(x.shape[-1])
        for name, n in outputs
    ]
    kernel = jnp.concatenate([k.astype(dtype) for k, _ in parts], axis=1)
    y = jax.lax.dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if use_bias:
        y = y + jnp.concatenate([b.astype(dtype) for _, b in parts])
    splits = [int(v) for v in np.cumsum([n for _, n in outputs])[:-1]]
    return jnp.split(y, splits, axis=-1)


def _per_device(fn, mesh: Mesh | None, in_specs, out_specs):
    """``fn`` as is without a mesh, else ``fn`` under ``jax.shard_map`` over ``mesh``."""
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


_SPEC_QKV = P(BATCH_AXES, TENSOR, None, None)  # (B, NH, S, D)
_SPEC_GATE = P(BATCH_AXES, TENSOR, None)  # (B, NH, S)
_SPEC_STATE = MLSTMState(P(BATCH_AXES, TENSOR, None, None), P(BATCH_AXES, TENSOR, None), P(BATCH_AXES, TENSOR))
_SPEC_STEP_VEC = P(BATCH_AXES, TENSOR, None)  # (B, NH, D)
_SPEC_STEP_GATE = P(BATCH_AXES, TENSOR)  # (B, NH)


def mlstm_sequence(
    config: xLSTMLMConfig,
    mesh: Mesh | None,
    matQ: jax.Array,  # (B, NH, S, DHQK)
    matK: jax.Array,  # (B, NH, S, DHQK)
    matV: jax.Array,  # (B, NH, S, DHV)
    vecI: jax.Array,  # (B, NH, S)
    vecF: jax.Array,  # (B, NH, S)
    state: MLSTMState | None = None,  # initial state or None (zeros)
    return_last_states: bool = False,
    segment_ids: jax.Array | None = None,  # (B, S) integers: packed documents
):
    """Run the mLSTM cell over a sequence with the configured backend (per device with a mesh).

    Returns h (B, NH, S, DHV), and with ``return_last_states`` also the last ``MLSTMState``.
    ``segment_ids`` marks packed documents: each starts from the empty state (``kernels.validation``).
    """
    # an unbound backend module, built from the registry: the model config fills what the backend needs
    backend = create_mlstm_backend(
        config.mlstm_backend, model_config=config, **config.backend_kwargs
    ).clone(parent=None)

    def run(q, k, v, i, f, *rest):
        seg, st = (rest[0], rest[1:]) if segment_ids is not None else (None, rest)
        kw = {} if seg is None else {"segment_ids": seg}
        out = backend.apply({}, q, k, v, i, f, *st, return_last_states=return_last_states, **kw)
        if return_last_states:
            h, last = out
            return h, MLSTMState(*last)
        return out

    seg_args = (segment_ids,) if segment_ids is not None else ()
    args = (matQ, matK, matV, vecI, vecF) + seg_args + (tuple(state) if state is not None else ())
    in_specs = ((_SPEC_QKV,) * 3 + (_SPEC_GATE,) * 2 + (P(BATCH_AXES, None),) * len(seg_args)
                + (tuple(_SPEC_STATE) if state is not None else ()))
    out_specs = (_SPEC_QKV, _SPEC_STATE) if return_last_states else _SPEC_QKV
    with jax.named_scope("mlstm_cell"):  # names the cell's ops in profiles
        return _per_device(run, mesh, in_specs, out_specs)(*args)


def cell_options(config: xLSTMLMConfig) -> CellOptions:
    """The cell options of the configured backend (its config's ``cell_options``), so that decoding
    computes the same cell as the backend."""
    from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend_config

    return create_mlstm_backend_config(config.mlstm_backend, **config.backend_kwargs).cell_options


def step_kernel_options(config: xLSTMLMConfig) -> dict[str, Any]:
    """``cell_options(config)`` as the step kernels' flat keywords."""
    return cell_options(config).as_kwargs()


def mlstm_step(
    config: xLSTMLMConfig,
    mesh: Mesh | None,
    vecQ: jax.Array,  # (B, NH, DHQK)
    vecK: jax.Array,  # (B, NH, DHQK)
    vecV: jax.Array,  # (B, NH, DHV)
    scaI: jax.Array,  # (B, NH)
    scaF: jax.Array,  # (B, NH)
    state: MLSTMState,  # the state before this token
) -> tuple[jax.Array, MLSTMState]:
    """One token of the mLSTM cell: ``xlstm_jax.inference.decode_step`` with the configured step
    kernel and the backend's cell options. Returns h (B, NH, DHV) and the new state."""
    options = cell_options(config)

    def run(q, k, v, i, f, C, n, m):
        return decode_step(MLSTMState(C, n, m), q, k, v, i, f, step_kernel=config.mlstm_step_kernel, options=options)

    in_specs = (_SPEC_STEP_VEC,) * 3 + (_SPEC_STEP_GATE,) * 2 + tuple(_SPEC_STATE)
    return _per_device(run, mesh, in_specs, (_SPEC_STEP_VEC, _SPEC_STATE))(
        vecQ, vecK, vecV, scaI, scaF, *state
    )


def zero_state(config: xLSTMLMConfig, batch_size: int, dtype=jnp.float32) -> MLSTMState:
    """The all-zero cell state of one layer (m = 0, the recurrent convention)."""
    B, NH, DHQK, DHV = batch_size, config.num_heads, config.qk_head_dim, config.v_head_dim
    return MLSTMState(
        jnp.zeros((B, NH, DHQK, DHV), dtype), jnp.zeros((B, NH, DHQK), dtype), jnp.zeros((B, NH), dtype)
    )


class mLSTMLayer(nn.Module):
    """The xLSTM-7B mLSTM layer: projections, capped gates, cell, multi-head norm, output gate."""

    config: xLSTMLMConfig
    mesh: Mesh | None = None
    mode: str = "sequence"
    return_last_states: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # (B, S, E), already normalised
        state: MLSTMState | None = None,  # per-layer state or None
        mask: jax.Array | None = None,  # (B, S) bool: real tokens (sequence mode); None: all
        segment_ids: jax.Array | None = None,  # (B, S) integers: packed documents (sequence mode)
    ) -> tuple[jax.Array, MLSTMState | None]:
        cfg = self.config
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        B, S, E = x.shape
        if E != cfg.embedding_dim:
            raise ValueError(f"input has shape {x.shape}; expected (B, S, {cfg.embedding_dim})")
        NH, DHQK, DHV = cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim
        dt, pdt, gdt = cfg.compute_dtype, cfg.params_dtype, _float_dtype(cfg.compute_dtype)
        dense = functools.partial(
            nn.Dense, use_bias=cfg.use_bias, dtype=dt, param_dtype=pdt, kernel_init=small_init(E)
        )
        if cfg.fused_projections:
            matQ, matK, matV, vecO = fused_dense(
                x, (("q", NH * DHQK), ("k", NH * DHQK), ("v", NH * DHV), ("ogate", NH * DHV)),
                use_bias=cfg.use_bias, dtype=dt, param_dtype=pdt, kernel_init=small_init(E),
            )
        else:
            matQ = dense(NH * DHQK, name="q")(x)
            matK = dense(NH * DHQK, name="k")(x)
            matV = dense(NH * DHV, name="v")(x)
            vecO = dense(NH * DHV, name="ogate")(x)
        gate = functools.partial(nn.Dense, NH, use_bias=True, dtype=gdt, param_dtype=pdt, kernel_init=small_init(E))
        vecI = gate(name="igate", bias_init=nn.initializers.constant(cfg.igate_bias_init))(x)
        vecF = gate(name="fgate", bias_init=linspace_init(*cfg.fgate_bias_init_range))(x)
        vecI, vecF = soft_cap(vecI, cfg.gate_soft_cap), soft_cap(vecF, cfg.gate_soft_cap)

        heads = lambda t, D: t.reshape(B, S, NH, D).transpose(0, 2, 1, 3)  # noqa: E731  (B, NH, S, D)
        matQ, matK, matV = heads(matQ, DHQK), heads(matK, DHQK), heads(matV, DHV)
        vecI, vecF = vecI.transpose(0, 2, 1), vecF.transpose(0, 2, 1)  # (B, NH, S)
        if mask is not None:
            if self.mode == "step":
                raise ValueError("mask applies to sequence mode only (every decoded token is real)")
            vecI, vecF = mask_gates(vecI, vecF, mask)
        if segment_ids is not None and self.mode == "step":
            raise ValueError("segment_ids apply to sequence mode only (decode a new document from zero states)")

        new_state = None
        if self.mode == "step":
            if S != 1:
                raise ValueError(f"step mode takes one token: x has shape {x.shape}")
            if state is None:
                state = zero_state(cfg, B, gdt)
            h, new_state = mlstm_step(
                cfg, self.mesh, matQ[:, :, 0], matK[:, :, 0], matV[:, :, 0], vecI[:, :, 0], vecF[:, :, 0], state
            )
            h = h[:, :, None]
        elif self.return_last_states:
            h, new_state = mlstm_sequence(cfg, self.mesh, matQ, matK, matV, vecI, vecF, state, True, segment_ids)
        else:
            h = mlstm_sequence(cfg, self.mesh, matQ, matK, matV, vecI, vecF, state, False, segment_ids)
        h = h.transpose(0, 2, 1, 3)  # (B, S, NH, DHV)
        h = MultiHeadNorm(
            eps=cfg.norm_eps, dtype=dt, param_dtype=pdt, kind=cfg.multihead_norm, use_bias=cfg.use_bias,
            force_float32=cfg.norm_reduction_force_float32, name="mh_norm",
        )(h)
        h = nn.sigmoid(vecO) * h
        y = dense(E, name="out_proj", kernel_init=wang_init(E, cfg.num_blocks))(h)
        return y, new_state


class FeedForward(nn.Module):
    """Gated (SwiGLU) feed-forward: W_down (silu(W_gate x) * W_up x), inner width F."""

    config: xLSTMLMConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, S, E) -> (B, S, E)
        cfg = self.config
        E, F = cfg.embedding_dim, cfg.ffn_dim
        dense = functools.partial(
            nn.Dense, use_bias=cfg.use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype
        )
        gate = dense(F, name="up_gate", kernel_init=small_init(E))(x)
        up = dense(F, name="up", kernel_init=small_init(E))(x)
        return dense(E, name="down", kernel_init=wang_init(E, cfg.num_blocks))(nn.silu(gate) * up)


class mLSTMBlock(nn.Module):
    """Pre-norm residual block: x + mLSTMLayer(norm(x)), then x + FeedForward(norm(x)).

    Called as ``(x, state) -> (x, new_state)`` (with ``mask`` and ``segment_ids`` (B, S) as optional
    third and fourth arguments, the same for every block) so that ``nn.scan`` can stack the blocks.
    """

    config: xLSTMLMConfig
    mesh: Mesh | None = None
    mode: str = "sequence"
    return_last_states: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, state: MLSTMState | None, mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None):
        # x (B, S, E) in the residual dtype; mask (B, S) bool or None
        cfg = self.config
        norm = functools.partial(
            RMSNorm, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            use_bias=cfg.use_bias, force_float32=cfg.norm_reduction_force_float32,
        )
        h, new_state = mLSTMLayer(
            cfg, self.mesh, self.mode, self.return_last_states, name="mlstm"
        )(norm(name="norm_mlstm")(x), state, mask, segment_ids)
        x = x + h.astype(x.dtype)
        x = x + FeedForward(cfg, name="ffn")(norm(name="norm_ffn")(x)).astype(x.dtype)
        return x, new_state
