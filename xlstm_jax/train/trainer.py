"""The train state, the optimizer and the jitted train / eval steps of one configuration.

Notation: tokens (B, S + 1) int32 per batch (inputs ``[:, :-1]``, next-token targets ``[:, 1:]``),
or packed (B, 2, S + 1) tokens and segment ids (``packing.py``: targets across a document border are
masked out); losses are mean cross entropies in nats per byte token.

``Trainer(model_config, train_config)`` builds the model, the AdamW optimizer (``make_schedule``:
linear warm-up counted from the first update, then cosine decay; global-norm clipping, weight decay
on matrices only) and the jitted steps. With ``train_config.mesh = (data, fsdp, tensor)`` the train
state is sharded over a ``jax.sharding.Mesh`` (parameters and optimizer moments FSDP-style, heads
over tensor; see ``xlstm_jax.models.xlstm_lm.sharding``) and every mLSTM kernel runs per device under
``jax.shard_map``; without a mesh everything runs on the default device. In a multi-process run
(``xlstm_jax.train.distributed``) the mesh spans the devices of all processes and each process feeds
only its rows of every batch (``local_rows``, ``put_batch``).

Nothing here touches files: the run loop (``xlstm_jax.train.run``) owns the run directory.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from xlstm_jax.models.xlstm_lm import sharding as shd
from xlstm_jax.models.xlstm_lm.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_lm.model import cast_compute_params, unstack_block_params, xLSTMLMModel

from . import checkpoint as ckpt
from .config import TrainConfig, sequence_length
from .data import HeldoutBatches
from .distributed import process_rows
from .packing import masked_lm_loss, split_batch

__all__ = [
    "TrainConfig",
    "TrainState",
    "Trainer",
    "get_trainer",
    "lm_loss",
    "make_optimizer",
    "make_schedule",
]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree): step counter, parameters, optimizer
    state, and the training RNG key (raw uint32 key data; split once per step and handed to the
    model as its ``dropout`` stream, unused by the current, deterministic model)."""

    step: jax.Array  # () int32
    params: Any
    opt_state: Any
    rng: jax.Array  # key data, uint32


def _decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: matrices ('kernel') and the embedding."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", "")) in ("kernel", "embedding"), params
    )


def make_schedule(tc: TrainConfig) -> optax.Schedule:
    """Learning rate of update number ``count`` (0-based, as optax counts).

    With n = count + 1 the 1-based update and W = ``warmup_steps``: n * peak / W for n <= W (the
    first update already trains, also when ``steps <= W``), then a cosine from the peak down to
    ``peak * min_lr_ratio`` at n = ``steps``, held there beyond.
    """
    peak = float(tc.learning_rate)
    end = peak * float(tc.min_lr_ratio)
    warmup = int(tc.warmup_steps)
    decay = max(int(tc.steps) - warmup, 1)

    def schedule(count):
        n = jnp.asarray(count, jnp.float32) + 1.0
        warm = peak * n / max(warmup, 1)
        frac = jnp.clip((n - warmup) / decay, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(n <= warmup, warm, cosine)

    return schedule


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay to ``min_lr_ratio``, and global-norm clipping."""
    schedule = make_schedule(tc)
    parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip > 0 else []
    parts.append(
        optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=_decay_mask)
    )
    return optax.chain(*parts)


def lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross entropy (nats); logits (B, S, V), targets (B, S)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


class Trainer:
    """The model, optimizer, shardings and jitted steps of one configuration."""

    def __init__(self, model_config: xLSTMLMConfig, train_config: TrainConfig, devices=None):
        self.model_config, self.tc = model_config, train_config
        self.seq_len = sequence_length(model_config, train_config)
        self.mesh: Mesh | None = None
        if train_config.mesh is not None:
            if devices is None and jax.process_count() > 1:
                # the devices of each process side by side: the batch rows of a process are one block
                # and a tensor-parallel group stays inside one process where it fits
                devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
            self.mesh = shd.make_mesh(train_config.mesh, devices)
            shd.validate_mesh(self.mesh, num_heads=model_config.num_heads, batch_size=train_config.batch_size)
        self.model = xLSTMLMModel(model_config, mesh=self.mesh)
        # the training step's model: the same blocks as a Python loop over per-block slices (speed option)
        self._train_model = (
            xLSTMLMModel(model_config, mesh=self.mesh, unrolled=True) if train_config.unroll_blocks else self.model
        )
        self.tx = make_optimizer(train_config)
        self.schedule = make_schedule(train_config)
        self.abstract_state = jax.eval_shape(self._init, jax.random.key_data(jax.random.key(0)))
        # packed batches carry the segment ids next to the tokens (``packing.py``)
        self.batch_shape = (train_config.batch_size,) + ((2,) if train_config.pack else ()) + (self.seq_len + 1,)
        self._init_given_jit = None  # init_state(params=...), compiled on first use
        if self.mesh is None:
            self.state_shardings = None
            self.batch_sharding = None
            self._local_rows: slice | np.ndarray = slice(0, train_config.batch_size)
            self._train_step = jax.jit(self._step, donate_argnums=(0,))
            self._eval_step = jax.jit(self._eval)
            self._init_jit = jax.jit(self._init)
        else:
            self.state_shardings = self._state_shardings(self.abstract_state)
            self.batch_sharding = shd.batch_sharding(self.mesh, len(self.batch_shape))
            self._local_rows = process_rows(self.batch_sharding, self.batch_shape)
            rep = shd.replicated(self.mesh)
            self._train_step = jax.jit(
                self._step, in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, rep), donate_argnums=(0,),
            )
            self._eval_step = jax.jit(
                self._eval, in_shardings=(self.state_shardings.params, self.batch_sharding), out_shardings=rep
            )
            self._init_jit = jax.jit(self._init, in_shardings=rep, out_shardings=self.state_shardings)

    # ------------------------------------------------------------------ pure functions
    def _init(self, rng_data: jax.Array) -> TrainState:
        key = jax.random.wrap_key_data(rng_data)
        k_params, k_train = jax.random.split(key)
        tokens = jnp.zeros((1, min(self.seq_len, 8)), jnp.int32)  # shapes of parameters only
        # initialise without the mesh (parameter values do not depend on it)
        params = xLSTMLMModel(self.model_config).init(k_params, tokens)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
            rng=jax.random.key_data(k_train),
        )

    def _loss(self, params, batch, rng):
        if self.tc.cast_params:
            params = cast_compute_params(params, self.model_config)
        if self.tc.unroll_blocks:
            params = unstack_block_params(params)  # slices inside the step: the gradient is stacked again
        inputs, targets, segment_ids, mask = split_batch(batch)
        logits = self._train_model.apply({"params": params}, inputs, rngs={"dropout": rng}, segment_ids=segment_ids)
        with jax.named_scope("loss"):  # names the loss's ops in profiles (tools/trace_summary.py)
            return masked_lm_loss(logits, targets, mask)

    def _step(self, state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        loss, grads = jax.value_and_grad(self._loss)(state.params, batch, step_rng)
        with jax.named_scope("optimizer"):  # names the optimizer's ops in profiles (tools/trace_summary.py)
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng))
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return new_state, {"loss": loss, "grad_norm": grad_norm}

    def _eval(self, params, batch: jax.Array) -> jax.Array:
        inputs, targets, segment_ids, mask = split_batch(batch)
        return masked_lm_loss(self.model.apply({"params": params}, inputs, segment_ids=segment_ids), targets, mask)

    def _state_shardings(self, abstract_state: TrainState) -> TrainState:
        mesh = self.mesh
        param_specs = shd.param_partition_specs(abstract_state.params, mesh)
        is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
        opt_specs = optax.tree_map_params(
            self.tx, lambda _, spec: spec, abstract_state.opt_state, param_specs,
            transform_non_params=lambda _: jax.sharding.PartitionSpec(), is_leaf=is_spec,
        )
        specs = TrainState(
            step=jax.sharding.PartitionSpec(), params=param_specs, opt_state=opt_specs,
            rng=jax.sharding.PartitionSpec(),
        )
        return shd.named_shardings(specs, mesh)

    # ------------------------------------------------------------------ public API
    def init_state(self, seed: int | None = None, params: Any = None) -> TrainState:
        """A fresh train state (placed on the mesh if there is one). ``params``: the initial
        parameters (e.g. ``hf.load_pretrained(dir, config=model_config, mesh=trainer.mesh)``; the
        structure, shapes and dtypes of this model's, placed as ``state_shardings.params``) instead
        of random ones; the optimizer state and training RNG are those of a fresh run of ``seed``.
        ``params`` is donated."""
        seed = self.tc.seed if seed is None else seed
        # host data (the same on every process), so that it can enter a mesh spanning processes
        rng_data = np.asarray(jax.random.key_data(jax.random.key(seed)))
        if params is None:
            return self._init_jit(rng_data)
        want = self.abstract_state.params
        if jax.tree.structure(params) != jax.tree.structure(want):
            raise ValueError(
                f"params do not have this model's structure: {jax.tree.structure(params)} vs {jax.tree.structure(want)}"
            )
        bad = [
            f"{jax.tree_util.keystr(path)}: {tuple(x.shape)} {x.dtype} (want {tuple(w.shape)} {w.dtype})"
            for (path, x), w in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want))
            if tuple(x.shape) != tuple(w.shape) or x.dtype != w.dtype
        ]
        if bad:
            raise ValueError(f"params differ from this model's in shape or dtype: {bad[:4]}")
        if self._init_given_jit is None:
            if self.mesh is None:
                self._init_given_jit = jax.jit(self._init_given, donate_argnums=(1,))
            else:
                self._init_given_jit = jax.jit(
                    self._init_given, in_shardings=(shd.replicated(self.mesh), self.state_shardings.params),
                    out_shardings=self.state_shardings, donate_argnums=(1,),
                )
        return self._init_given_jit(rng_data, params)

    def _init_given(self, rng_data: jax.Array, params: Any) -> TrainState:
        """``_init`` with the given parameters: the same split of the seed's key, so the training RNG
        is that of a run with random initial parameters."""
        _, k_train = jax.random.split(jax.random.wrap_key_data(rng_data))
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
            rng=jax.random.key_data(k_train),
        )

    @property
    def local_rows(self) -> slice | np.ndarray:
        """The rows of every global batch (B, S + 1) that this process feeds: all of them in a
        one-process run; in a multi-process run the rows that this process's devices hold under the
        batch sharding (``distributed.process_rows``: a slice, or an index array if the process's
        blocks are not contiguous), in the order ``put_batch`` expects them.

        The run loop reads only these rows from the data and hands them to ``train_step``.
        """
        return self._local_rows

    def put_batch(self, rows: np.ndarray) -> jax.Array:
        """The global batch (B, S + 1) on the device(s), split over the batch axes of the mesh, from
        this process's rows ``local_rows`` of it (in one process: the whole batch; in several, each
        process passes only its rows and ``jax.make_array_from_process_local_data`` assembles the
        global array without any host holding all of it)."""
        if self.batch_sharding is None:
            return jnp.asarray(rows)
        if jax.process_count() == 1:
            return jax.device_put(rows, self.batch_sharding)
        return jax.make_array_from_process_local_data(self.batch_sharding, rows, self.batch_shape)

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on this process's rows ``batch`` of the global batch (``state`` is
        donated). Returns the new state and {loss, grad_norm} (device scalars, replicated)."""
        return self._train_step(state, self.put_batch(np.asarray(batch)))

    def eval_loss(self, params, batches: HeldoutBatches | Sequence[np.ndarray]) -> float:
        """Mean loss over the given global batches: each process reads or puts only its
        ``local_rows`` of each (``HeldoutBatches.batch(i, rows)`` builds only those rows)."""
        losses = []
        for i in range(len(batches)):
            if isinstance(batches, HeldoutBatches):
                rows = batches.batch(i, self.local_rows)
            else:
                rows = np.asarray(batches[i])[self.local_rows]
            losses.append(self._eval_step(params, self.put_batch(rows)))
        return float(np.mean([float(x) for x in losses]))

    def abstract_train_state(self) -> tuple[Any, dict[str, Any]]:
        """Abstract targets (with shardings) of the two checkpoint items: params and the rest."""
        sh = self.state_shardings
        if sh is None:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            sh = jax.tree.map(lambda _: dev, self.abstract_state)
        a = ckpt.abstract_like(self.abstract_state, sh)
        return a.params, {"step": a.step, "opt_state": a.opt_state, "rng": a.rng}

    def devices(self) -> list:
        """The devices this trainer runs on (in a multi-process run: those of all processes)."""
        return list(self.mesh.devices.flat) if self.mesh is not None else [jax.devices()[0]]

    def local_devices(self) -> list:
        """The devices of ``devices()`` that belong to this process."""
        return [d for d in self.devices() if d.process_index == jax.process_index()]


# Settings that do not change the compiled functions of a Trainer.
_BOOKKEEPING = dict(out_dir="", log_every=1, eval_every=0, checkpoint_every=0, keep_checkpoints=1, checkpoints=True, data=(),
                   init_from=None, tokenizer="bytes")


@functools.lru_cache(maxsize=4)
def _cached_trainer(model_config: xLSTMLMConfig, tc: TrainConfig) -> Trainer:
    return Trainer(model_config, tc)


def get_trainer(model_config: xLSTMLMConfig, tc: TrainConfig) -> Trainer:
    """A ``Trainer`` for these configs, shared by runs in one process that differ only in bookkeeping
    (run directory, logging, evaluation and checkpoint intervals), so they compile once."""
    return _cached_trainer(model_config, dataclasses.replace(tc, **_BOOKKEEPING))
