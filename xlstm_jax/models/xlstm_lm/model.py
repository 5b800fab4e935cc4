"""The xLSTM language model: embedding, NB stacked mLSTM blocks (``nn.scan``), final norm, LM head.

Notation (see ``config.py``): tokens (B, S) int32, logits (B, S, V) float32 (float64 for float64
models). The per-layer cell states of all blocks are stacked along a leading block axis:

    states = MLSTMState(matC (NB, B, NH, DHQK, DHV), vecN (NB, B, NH, DHQK), scaM (NB, B, NH))

Calls:

    model.apply(v, tokens)                                   -> logits
    model.apply(v, tokens, states, return_last_states=True)  -> (logits, states)   (prefill / chunks)
    model.apply(v, token, states, mode="step")               -> (logits, states)   (token (B, 1))

Serving options of the sequence mode: ``mask`` (B, S) bool marks the real tokens of right-padded
rows (padded positions leave every cell state untouched, see ``layers.py``), and ``logits_at`` (B,)
int computes the LM head at one position per row only (logits (B, 1, V): a prefill needs the last
real position's logits, not B * S * V of them). ``segment_ids`` (B, S) int packs documents into a
row: each document starts from the empty cell state (the kernels' ``segment_ids``; training packs).

The block stack is one ``nn.scan`` by default (``unrolled=False``: parameters of the blocks stacked
along a leading NB axis under ``"blocks"``; compile time independent of depth; ``config.remat``
recomputes each block in the backward pass, keeping what ``config.remat_policy`` saves).
``unrolled=True`` runs the same blocks in a Python loop
over per-block parameters ``"blocks_0"``, ``"blocks_1"``, ... (``unstack_block_params`` /
``stack_block_params`` convert): no per-step slicing of stacked weights, for decoding. With a
``mesh`` (axes data, fsdp, tensor; see ``sharding.py``) the batch is constrained to (data, fsdp) and
every mLSTM cell runs per device under ``jax.shard_map``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xlstm_jax.kernels import MLSTMState

from .config import xLSTMLMConfig
from .layers import MODES, RMSNorm, mLSTMBlock, small_init, soft_cap, zero_state
from .sharding import BATCH_AXES, validate_mesh


class Embedding(nn.Module):
    """Token embedding table (V, E). With a mesh the (FSDP-sharded) table is gathered before the
    lookup, so the looked-up vectors keep the batch sharding of the tokens."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    mesh: Mesh | None = None

    def setup(self):
        self.embedding = self.param(
            "embedding", small_init(self.features), (self.num_embeddings, self.features), self.param_dtype
        )

    def _table(self) -> jax.Array:
        table = self.embedding
        if self.mesh is not None:
            table = jax.lax.with_sharding_constraint(table, NamedSharding(self.mesh, P()))
        return table.astype(self.dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # (B, S) int -> (B, S, E)
        return jnp.take(self._table(), tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:  # (B, S, E) -> (B, S, V)
        """Logits against the embedding table (tied LM head)."""
        return x @ self._table().T


class xLSTMLMModel(nn.Module):
    """xLSTM language model (xLSTM-7B blocks) over a vocabulary of ``config.vocab_size``.

    ``unrolled`` selects the parameter layout of the blocks (see the module docstring); both
    layouts compute the same function.
    """

    config: xLSTMLMConfig
    mesh: Mesh | None = None
    unrolled: bool = False

    def _constrain(self, x: jax.Array) -> jax.Array:
        if self.mesh is None:
            return x
        spec = P(BATCH_AXES, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # (B, S) int
        states: MLSTMState | None = None,  # stacked per-block states, or None (zeros)
        return_last_states: bool = False,
        mode: str = "sequence",
        *,
        mask: jax.Array | None = None,  # (B, S) bool: real tokens (sequence mode); None: all real
        logits_at: jax.Array | None = None,  # (B,) int: the one position per row to compute logits at
        segment_ids: jax.Array | None = None,  # (B, S) int: packed documents (sequence mode)
    ):
        cfg = self.config
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, S); got {tokens.shape}")
        B, S = tokens.shape
        if mode == "step" and S != 1:
            raise ValueError(f"mode='step' takes tokens of shape (B, 1); got {tokens.shape}")
        if mask is not None:
            if mode == "step":
                raise ValueError("mask applies to mode='sequence' only")
            if tuple(mask.shape) != (B, S) or mask.dtype != jnp.bool_:
                raise ValueError(f"mask must be a bool array of shape (B, S) = {(B, S)}; got {mask.dtype} {mask.shape}")
        if segment_ids is not None:
            if mode == "step":
                raise ValueError("segment_ids apply to mode='sequence' only")
            if tuple(segment_ids.shape) != (B, S) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                raise ValueError(
                    f"segment_ids must be an int array of shape (B, S) = {(B, S)}; got {segment_ids.dtype} "
                    f"{segment_ids.shape}"
                )
        if logits_at is not None:
            if tuple(logits_at.shape) != (B,) or not jnp.issubdtype(logits_at.dtype, jnp.integer):
                raise ValueError(f"logits_at must be an int array of shape (B,) = {(B,)}; got {logits_at.dtype} {logits_at.shape}")
        if self.mesh is not None:
            validate_mesh(self.mesh, num_heads=cfg.num_heads, batch_size=B)
        resid_dtype = residual_dtype(cfg)
        if states is not None:
            want = (cfg.num_blocks, B, cfg.num_heads)
            if tuple(states.scaM.shape) != want:
                raise ValueError(f"states.scaM has shape {states.scaM.shape}; expected {want} (NB, B, NH)")
        elif mode == "step":
            states = jax.tree.map(
                lambda x: jnp.broadcast_to(x, (cfg.num_blocks,) + x.shape),
                zero_state(cfg, B, jnp.promote_types(cfg.compute_dtype, jnp.float32)),
            )

        embed = Embedding(
            cfg.vocab_size, cfg.embedding_dim, dtype=resid_dtype, param_dtype=cfg.params_dtype,
            mesh=self.mesh, name="embedding",
        )
        x = self._constrain(embed(tokens))  # (B, S, E)

        block = mLSTMBlock
        if cfg.remat:
            policy = None if cfg.remat_policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            block = nn.remat(block, prevent_cse=False, policy=policy)
        keep_states = return_last_states or mode == "step"
        if self.unrolled:
            outs = []
            for idx in range(cfg.num_blocks):
                st = None if states is None else jax.tree.map(lambda a, idx=idx: a[idx], states)
                x, new = block(cfg, self.mesh, mode, keep_states, name=f"blocks_{idx}")(x, st, mask, segment_ids)
                outs.append(new)
            new_states = jax.tree.map(lambda *a: jnp.stack(a), *outs) if keep_states else None
        else:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                out_axes=0,
                length=cfg.num_blocks,
            )(cfg, self.mesh, mode, keep_states, name="blocks")
            x, new_states = stack(x, states, mask, segment_ids)
        x = self._constrain(x)

        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)  # (B, 1, E)
        # transformers' final norm: float32 reduction, no bias, whatever the config says
        x = RMSNorm(eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name="out_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x.astype(resid_dtype))
        else:
            logits = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                kernel_init=small_init(cfg.embedding_dim), name="lm_head",
            )(x)
        logits = soft_cap(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), cfg.output_logit_soft_cap)
        if keep_states:
            return logits, new_states
        return logits


def residual_dtype(config: xLSTMLMConfig) -> jnp.dtype:
    """The dtype of the residual stream: ``promote(dtype, param_dtype)``, or ``dtype`` with
    ``config.residual_in_compute_dtype``."""
    if config.residual_in_compute_dtype:
        return jnp.dtype(config.compute_dtype)
    return jnp.promote_types(config.compute_dtype, config.params_dtype)


def init_params(config: xLSTMLMConfig, key: jax.Array, batch_size: int = 1, seq_len: int | None = None):
    """Initial parameters of ``xLSTMLMModel(config)`` (a dict of arrays)."""
    S = seq_len or min(config.context_length, 8)
    tokens = jnp.zeros((batch_size, S), jnp.int32)
    return xLSTMLMModel(config).init(key, tokens)["params"]


# parameters that the model uses in a dtype of their own (float32 gates, the residual-dtype embedding)
_OWN_DTYPE_PARAMS = ("igate", "fgate", "embedding")


def cast_compute_params(params: Any, config: xLSTMLMConfig) -> Any:
    """``params`` with every leaf that the model only ever uses cast to ``config.dtype`` cast to it
    now (all but the gate projections, computed in float32, and the embedding, kept in the residual
    dtype), so that a step casts each weight once instead of at every use (and again in each
    rematerialised forward). The model computes the same function from the result; its gradient
    with respect to ``params`` is the same as without the cast. Identity when ``config.dtype`` is
    not narrower than ``config.param_dtype``."""
    dt, pdt = config.compute_dtype, config.params_dtype
    if jnp.dtype(dt).itemsize >= jnp.dtype(pdt).itemsize:
        return params

    def cast(path, leaf):
        names = {str(getattr(p, "key", "")) for p in path}
        if names & set(_OWN_DTYPE_PARAMS) or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        return leaf.astype(dt)

    return jax.tree_util.tree_map_with_path(cast, params)


def unstack_block_params(params: Any) -> Any:
    """Parameters of the stacked layout (``"blocks"`` with a leading NB axis) in the unrolled layout
    (``"blocks_0"`` ... ``"blocks_{NB-1}"``) of ``xLSTMLMModel(..., unrolled=True)``.

    The slices are new arrays: delete the stacked ones afterwards to free their memory.
    """
    if "blocks" not in params:
        raise ValueError(f"params have no stacked 'blocks' entry; keys: {sorted(params)}")
    blocks = params["blocks"]
    NB = jax.tree.leaves(blocks)[0].shape[0]
    # one split per leaf, not NB slices: under differentiation (``TrainConfig.unroll_blocks``) the
    # transpose of a split is one concatenation, that of NB slices NB zero-padded full-size arrays
    pieces = jax.tree.map(lambda a: [jnp.squeeze(x, 0) for x in jnp.split(a, NB, axis=0)], blocks)
    out = {k: v for k, v in params.items() if k != "blocks"}
    for idx in range(NB):
        out[f"blocks_{idx}"] = jax.tree.map(lambda p, idx=idx: p[idx], pieces, is_leaf=lambda x: isinstance(x, list))
    return out


def stack_block_params(params: Any) -> Any:
    """The inverse of ``unstack_block_params``: per-block parameters stacked under ``"blocks"``."""
    names = sorted((k for k in params if k.startswith("blocks_")), key=lambda k: int(k.split("_")[1]))
    if not names or [int(k.split("_")[1]) for k in names] != list(range(len(names))):
        raise ValueError(f"params need entries blocks_0 ... blocks_{{NB-1}}; keys: {sorted(params)}")
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    out["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *(params[k] for k in names))
    return out
