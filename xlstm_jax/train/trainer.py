"""Training of the xLSTM language model: optimizer, train/eval steps, sharding, the resumable loop.

Notation: tokens (B, S + 1) int32 per batch (inputs ``[:, :-1]``, next-token targets ``[:, 1:]``);
losses are mean cross entropies in nats per byte token.

``Trainer(model_config, train_config)`` builds the model, the AdamW optimizer (warm-up + cosine
schedule, global-norm clipping, weight decay on matrices only) and the jitted steps. With
``train_config.mesh = (data, fsdp, tensor)`` the train state is sharded over a
``jax.sharding.Mesh`` (parameters and optimizer moments FSDP-style, heads over tensor; see
``xlstm_jax.models.xlstm_lm.sharding``) and every mLSTM kernel runs per device under
``jax.shard_map``; without a mesh everything runs on the default device.

``train(model_config, train_config)`` is the whole job: corpus, split, unigram entropy, init or
resume from the newest checkpoint (parameters, optimizer, step, RNG and the data iterator position),
a tqdm progress bar with loss and tokens/s, periodic evaluation and checkpoints. Ctrl-C (SIGINT) stops
after the current step and saves a checkpoint at it, so resuming loses no step (a second Ctrl-C aborts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from xlstm_jax.models.xlstm_lm import sharding as shd
from xlstm_jax.models.xlstm_lm.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_lm.model import xLSTMLMModel

from . import checkpoint as ckpt
from .data import (
    BatchSampler,
    DataState,
    bits_per_byte,
    heldout_batches,
    load_corpus,
    split_corpus,
    unigram_entropy,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and bookkeeping of a training run (the model has its own ``xLSTMLMConfig``)."""

    out_dir: str = "runs/default"
    """Run directory: config, checkpoints, metrics (see ``checkpoint.py``)."""
    data: tuple[str, ...] = ()
    """UTF-8 text files to train on; empty: the embedded CPython documentation corpus."""
    steps: int = 600
    """Total optimizer steps of the run (a resumed run continues up to this number)."""
    batch_size: int = 16
    """Global batch size B (split over data x fsdp)."""
    seq_len: int = 0
    """Training sequence length S; 0: the model's context_length."""
    learning_rate: float = 3e-3
    """Peak learning rate."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at learning_rate * min_lr_ratio."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW) on weight matrices and the embedding."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0: off)."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.95
    """Adam beta2."""
    eval_every: int = 50
    """Evaluate on the held-out split every this many steps (0: only at the end)."""
    eval_batches: int = 8
    """Held-out batches per evaluation (0: no evaluation)."""
    checkpoint_every: int = 200
    """Save a checkpoint every this many steps (0: only at the end and on interrupt)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    log_every: int = 10
    """Progress bar / console update interval in steps (every step's loss goes to metrics.jsonl)."""
    heldout_fraction: float = 0.05
    """Fraction of the text (its end) held out for evaluation."""
    seed: int = 0
    """Seed of parameters, data order and the training RNG."""
    mesh: tuple[int, int, int] | None = None
    """(data, fsdp, tensor) device mesh; None: a single device, no mesh."""
    checkpoints: bool = True
    """Write checkpoints (off for throughput measurements)."""

    def __post_init__(self):
        object.__setattr__(self, "data", tuple(self.data))
        if self.mesh is not None:
            object.__setattr__(self, "mesh", tuple(int(m) for m in self.mesh))
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("seq_len", "warmup_steps", "eval_every", "eval_batches", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        d["mesh"] = list(self.mesh) if self.mesh is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of ``to_dict``; unknown keys raise ``ValueError``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        d = dict(d)
        if d.get("mesh") is not None:
            d["mesh"] = tuple(d["mesh"])
        return cls(**d)


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
    """Learning rate of update number ``count`` (0-based): linear warm-up, then cosine decay."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.learning_rate * tc.min_lr_ratio,
    )


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
        self.seq_len = train_config.seq_len or model_config.context_length
        self.mesh: Mesh | None = None
        if train_config.mesh is not None:
            self.mesh = shd.make_mesh(train_config.mesh, devices)
            shd.validate_mesh(self.mesh, num_heads=model_config.num_heads, batch_size=train_config.batch_size)
        self.model = xLSTMLMModel(model_config, mesh=self.mesh)
        self.tx = make_optimizer(train_config)
        self.schedule = make_schedule(train_config)
        self.abstract_state = jax.eval_shape(self._init, jax.random.key_data(jax.random.key(0)))
        if self.mesh is None:
            self.state_shardings = None
            self.batch_sharding = None
            self._train_step = jax.jit(self._step, donate_argnums=(0,))
            self._eval_step = jax.jit(self._eval)
            self._init_jit = jax.jit(self._init)
        else:
            self.state_shardings = self._state_shardings(self.abstract_state)
            self.batch_sharding = shd.batch_sharding(self.mesh, 2)
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
        logits = self.model.apply({"params": params}, batch[:, :-1], rngs={"dropout": rng})
        return lm_loss(logits, batch[:, 1:])

    def _step(self, state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        loss, grads = jax.value_and_grad(self._loss)(state.params, batch, step_rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng))
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return new_state, {"loss": loss, "grad_norm": grad_norm}

    def _eval(self, params, batch: jax.Array) -> jax.Array:
        return lm_loss(self.model.apply({"params": params}, batch[:, :-1]), batch[:, 1:])

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
    def init_state(self, seed: int | None = None) -> TrainState:
        """A fresh train state (placed on the mesh if there is one)."""
        seed = self.tc.seed if seed is None else seed
        return self._init_jit(jax.random.key_data(jax.random.key(seed)))

    def put_batch(self, batch: np.ndarray) -> jax.Array:
        """Move a host batch (B, S + 1) to the device(s), split over the batch axes of the mesh."""
        if self.batch_sharding is None:
            return jnp.asarray(batch)
        return jax.device_put(batch, self.batch_sharding)

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step (``state`` is donated). Returns the new state and {loss, grad_norm}."""
        return self._train_step(state, self.put_batch(np.asarray(batch)))

    def eval_loss(self, params, batches: list[np.ndarray]) -> float:
        """Mean loss over the given batches."""
        losses = [self._eval_step(params, self.put_batch(b)) for b in batches]
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
        """The devices this trainer runs on."""
        return list(self.mesh.devices.flat) if self.mesh is not None else [jax.devices()[0]]


# Settings that do not change the compiled functions of a Trainer.
_BOOKKEEPING = dict(out_dir="", log_every=1, eval_every=0, checkpoint_every=0, keep_checkpoints=1, checkpoints=True, data=())


@functools.lru_cache(maxsize=4)
def _cached_trainer(model_config: xLSTMLMConfig, tc: TrainConfig) -> Trainer:
    return Trainer(model_config, tc)


def get_trainer(model_config: xLSTMLMConfig, tc: TrainConfig) -> Trainer:
    """A ``Trainer`` for these configs, shared by runs in one process that differ only in bookkeeping
    (run directory, logging, evaluation and checkpoint intervals), so they compile once."""
    return _cached_trainer(model_config, dataclasses.replace(tc, **_BOOKKEEPING))


class _GracefulStop:
    """SIGINT sets ``requested``; the loop stops at the next step boundary. A second SIGINT aborts."""

    def __init__(self, notify: Callable[[str], None]):
        self.requested = False
        self._notify = notify
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        self._notify("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _peak_memory(devices) -> list[int | None]:
    out = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        out.append(int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None)
    return out


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drop metrics lines after ``last_step`` (written after the checkpoint a run resumes from)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip() and json.loads(ln)["step"] <= last_step]
    with open(path, "w") as fh:
        fh.writelines(lines)


def prepare_run_dir(model_config: xLSTMLMConfig, tc: TrainConfig, overwrite: bool = False) -> None:
    """Create the run directory and its config.json, or check that an existing run matches.

    An existing run with a different model config (or batch/sequence/optimizer settings that would
    change a resumed run) raises ``ValueError`` unless ``overwrite`` (which deletes the old run).
    """
    path = os.path.join(tc.out_dir, ckpt.CONFIG_FILE)
    if overwrite and os.path.isdir(tc.out_dir):
        known = {ckpt.CONFIG_FILE, ckpt.CHECKPOINT_DIR, ckpt.METRICS_FILE, ckpt.SUMMARY_FILE}
        others = sorted(set(os.listdir(tc.out_dir)) - known)
        if others:
            raise ValueError(
                f"--overwrite deletes run directories only; {tc.out_dir!r} also holds {others[:5]}"
            )
        shutil.rmtree(tc.out_dir)
    os.makedirs(tc.out_dir, exist_ok=True)
    want = {"model": model_config.to_dict(), "train": tc.to_dict(), "tokenizer": "bytes"}
    if os.path.exists(path):
        have = ckpt.read_json(path)
        if have.get("model") != want["model"]:
            diff = sorted(k for k in want["model"] if have.get("model", {}).get(k) != want["model"][k])
            raise ValueError(
                f"run directory {tc.out_dir!r} holds a model with a different config (fields {diff}); "
                "use another --out-dir or --overwrite"
            )
        fixed = ("data", "batch_size", "seq_len", "seed", "learning_rate", "warmup_steps", "min_lr_ratio",
                 "weight_decay", "grad_clip", "b1", "b2", "heldout_fraction")
        diff = sorted(k for k in fixed if have["train"].get(k) != want["train"][k])
        if diff:
            raise ValueError(
                f"run directory {tc.out_dir!r} was trained with different settings {diff}; resuming would "
                "not continue the same run: use another --out-dir or --overwrite"
            )
    ckpt.write_json(path, want)


def train(
    model_config: xLSTMLMConfig,
    tc: TrainConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    print_fn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run ``tc.out_dir``; returns the summary (also written to summary.json).

    ``on_step(step, metrics)`` is called after every step (tests use it to send SIGINT).
    """
    from tqdm.auto import tqdm

    say = print_fn or (lambda s: tqdm.write(s))
    seq_len = tc.seq_len or model_config.context_length
    tokens, source = load_corpus(tc.data)
    train_tokens, heldout_tokens = split_corpus(tokens, tc.heldout_fraction)
    h_uni = unigram_entropy(train_tokens, model_config.vocab_size)
    say(
        f"corpus: {source}: {len(tokens):,} bytes ({len(train_tokens):,} train, {len(heldout_tokens):,} held out); "
        f"unigram entropy {h_uni:.3f} nats/byte = {bits_per_byte(h_uni):.3f} bits/byte"
    )
    sampler = BatchSampler(train_tokens, tc.batch_size, seq_len, tc.seed)
    eval_data = heldout_batches(heldout_tokens, tc.batch_size, seq_len, tc.eval_batches) if tc.eval_batches else []

    trainer = get_trainer(model_config, tc)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
    mesh_txt = "one device" if trainer.mesh is None else f"mesh (data, fsdp, tensor) = {tc.mesh}"
    say(
        f"model: {n_params:,} parameters, E={model_config.embedding_dim} NB={model_config.num_blocks} "
        f"NH={model_config.num_heads}, backend {model_config.mlstm_backend}; {mesh_txt} on "
        f"{trainer.devices()[0].platform} x{len(trainer.devices())}; batch {tc.batch_size} x {seq_len} tokens"
    )

    prepare_run_dir(model_config, tc, overwrite)
    metrics_path = os.path.join(tc.out_dir, ckpt.METRICS_FILE)
    store = ckpt.CheckpointStore(tc.out_dir, tc.keep_checkpoints) if tc.checkpoints else None
    latest = store.latest_step() if store is not None else None
    if latest is not None:
        abs_params, abs_rest = trainer.abstract_train_state()
        params, rest, meta = store.restore(latest, abs_params, abs_rest)
        state = TrainState(step=rest["step"], params=params, opt_state=rest["opt_state"], rng=rest["rng"])
        data_state = DataState.from_dict(meta["data_state"])
        _truncate_metrics(metrics_path, latest)
        say(f"resumed from {store.directory}/{latest} (data epoch {data_state.epoch}, batch {data_state.position})")
    else:
        state, data_state = trainer.init_state(), DataState()
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
    step = int(state.step)

    def save(at_step: int) -> None:
        if store is None:
            return
        meta = {"step": at_step, "data_state": data_state.to_dict(), "corpus": source}
        store.save(at_step, state.params, {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}, meta)

    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_loss = last_eval = float("nan")
    timing = {"t": time.perf_counter(), "step": step}
    steady: list[tuple[float, int]] = []  # (seconds, tokens) of log intervals after the first
    first_interval = True
    tokens_per_step = tc.batch_size * seq_len
    t_start = time.perf_counter()

    def flush() -> None:
        nonlocal last_loss, first_interval
        if not pending:
            return
        values = [(s, {k: float(v) for k, v in m.items()}) for s, m in pending]  # syncs the device
        now = time.perf_counter()
        dt, ntok = now - timing["t"], (values[-1][0] - timing["step"]) * tokens_per_step
        if not first_interval:
            steady.append((dt, ntok))
        first_interval = False
        timing.update(t=now, step=values[-1][0])
        with open(metrics_path, "a") as fh:
            for s, m in values:
                fh.write(json.dumps({"step": s, "kind": "train", **m, "lr": float(trainer.schedule(s - 1))}) + "\n")
        last_loss = float(np.mean([m["loss"] for _, m in values]))
        pending.clear()
        if bar is not None:
            bar.set_postfix_str(f"loss {last_loss:.3f}  eval {last_eval:.3f}  {ntok / max(dt, 1e-9):,.0f} tok/s")

    def evaluate(at_step: int) -> None:
        nonlocal last_eval
        if not eval_data:
            return
        last_eval = trainer.eval_loss(state.params, eval_data)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps({"step": at_step, "kind": "eval", "loss": last_eval}) + "\n")
        say(f"step {at_step}: held-out loss {last_eval:.4f} nats/byte = {bits_per_byte(last_eval):.3f} bits/byte")
        if bar is not None:
            bar.set_postfix_str(f"loss {last_loss:.3f}  eval {last_eval:.3f}")

    bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not progress)
    interrupted = False
    try:
        if step == 0 and tc.eval_every:
            evaluate(0)  # the starting point of the curve
            timing["t"] = time.perf_counter()
        with _GracefulStop(say) as stop:
            while step < tc.steps:
                batch, next_data_state = sampler.batch(data_state)
                state, metrics = trainer.train_step(state, batch)
                data_state, step = next_data_state, step + 1
                pending.append((step, metrics))
                bar.update(1)
                if on_step is not None:
                    on_step(step, metrics)
                done = step == tc.steps or stop.requested
                if step % tc.log_every == 0 or done:
                    flush()
                if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                    flush()
                    evaluate(step)
                    timing["t"] = time.perf_counter()  # evaluation time is not training throughput
                if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or done:
                    flush()
                    save(step)
                    timing["t"] = time.perf_counter()
                if stop.requested:
                    interrupted = True
                    break
        flush()
    finally:
        bar.close()
        if store is not None:
            store.close()
    elapsed = time.perf_counter() - t_start

    sec = sum(t for t, _ in steady)
    summary = {
        "step": step,
        "steps": tc.steps,
        "interrupted": interrupted,
        "num_params": n_params,
        "train_loss_last_interval": last_loss,
        "eval_loss": last_eval,
        "eval_bits_per_byte": bits_per_byte(last_eval) if not math.isnan(last_eval) else None,
        "unigram_entropy_nats": h_uni,
        "unigram_entropy_bits": bits_per_byte(h_uni),
        "tokens_per_s": (sum(n for _, n in steady) / sec) if sec > 0 else None,
        "elapsed_s": elapsed,
        "devices": [str(d) for d in trainer.devices()],
        "mesh": list(tc.mesh) if tc.mesh is not None else None,
        "peak_memory_bytes": _peak_memory(trainer.devices()),
        "backend": model_config.mlstm_backend,
        "corpus": source,
    }
    ckpt.write_json(os.path.join(tc.out_dir, ckpt.SUMMARY_FILE), summary)
    if interrupted:
        say(f"stopped at step {step}; checkpoint saved. Run the same command again to resume.")
    return summary
