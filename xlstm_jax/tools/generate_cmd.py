"""``xlstm-jax generate``: sample text from a trained run's checkpoint.

The prompt is prefilled with the model's sequence backend (which returns the last states), then
tokens are decoded one by one with the step kernel; greedy (``--greedy`` or ``--temperature 0``) or
temperature / top-k sampling.
"""

from __future__ import annotations

import argparse
import os
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xlstm-jax generate``."""
    parser.add_argument("--run-dir", default="runs/default", help="run directory written by `xlstm-jax train`")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--prompt", default="The ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=300, help="bytes to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely bytes (0: all)")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely byte")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1, help="independent continuations (a batch)")
    parser.add_argument("--backend", default=None, help="prefill backend (default: the one trained with)")
    parser.add_argument("--step-kernel", default=None, help="decode step kernel (default: the run's)")


def load_run(run_dir: str, step: int | None = None, backend: str | None = None, step_kernel: str | None = None):
    """(model, params, config, step) of a run directory, on one device."""
    import jax

    from xlstm_jax.models.xlstm_lm import xLSTMLMConfig, xLSTMLMModel
    from xlstm_jax.models.xlstm_lm.model import init_params
    from xlstm_jax.train.checkpoint import CONFIG_FILE, CheckpointStore, abstract_like, read_json

    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{run_dir!r} is not a run directory (no {CONFIG_FILE}); train one with `xlstm-jax train`")
    config = xLSTMLMConfig.from_dict(read_json(path)["model"])
    changes = {}
    if backend is not None and backend != config.mlstm_backend:
        changes.update(mlstm_backend=backend, mlstm_backend_kwargs=())
    if step_kernel is not None:
        changes["mlstm_step_kernel"] = step_kernel
    config = config.replace(**changes) if changes else config
    store = CheckpointStore(run_dir, max_to_keep=None, read_only=True)
    step = store.latest_step() if step is None else step
    if step is None or step not in store.all_steps():
        raise ValueError(f"no checkpoint {'' if step is None else step} in {store.directory}; steps: {store.all_steps()}")
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    params, _ = store.restore_params(step, abstract_like(abstract, jax.tree.map(lambda _: dev, abstract)))
    store.close()
    return xLSTMLMModel(config), params, config, step


def run(args: argparse.Namespace) -> int:
    """Generate and print text."""
    import jax
    import numpy as np

    from xlstm_jax.models.xlstm_lm import generate
    from xlstm_jax.train.tokenizer import ByteTokenizer

    model, params, config, step = load_run(args.run_dir, args.step, args.backend, args.step_kernel)
    tok = ByteTokenizer()
    ids = tok.encode(args.prompt)
    if ids.size == 0:
        raise ValueError("--prompt must not be empty")
    prompt = np.tile(ids[None, :].astype(np.int32), (args.num_samples, 1))
    temperature = 0.0 if args.greedy else args.temperature
    t0 = time.perf_counter()
    out = generate(
        model, params, prompt, args.max_new_tokens, key=jax.random.key(args.seed),
        temperature=temperature, top_k=args.top_k,
    )
    out = np.asarray(jax.device_get(out))
    dt = time.perf_counter() - t0
    print(
        f"# {args.run_dir} step {step}: prefill {config.mlstm_backend}, decode {config.mlstm_step_kernel}, "
        f"{'greedy' if temperature == 0 else f'temperature {temperature}, top-k {args.top_k}'}; "
        f"{out.size} bytes in {dt:.1f} s (including compilation)"
    )
    for row in out:
        print("-" * 72)
        print(tok.decode(np.concatenate([ids, row.astype(np.uint8)])))
    return 0
