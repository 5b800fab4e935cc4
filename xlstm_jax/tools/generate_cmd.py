"""``xlstm-jax generate``: text from a trained run's checkpoint or a transformers checkpoint directory.

``--run-dir DIR`` (default ``runs/default``) restores a run written by ``xlstm-jax train`` (with the
tokenizer the run recorded: bytes, or the tokenizer.json of ``train --tokenizer`` / ``--init-from``); ``--model DIR`` loads a transformers ``xLSTMForCausalLM`` directory (e.g. NX-AI/xLSTM-7b,
or one written by ``save_pretrained``) with its ``tokenizer.json`` when it has one. ``--tokenizer``
overrides the tokenizer ("bytes" or a tokenizer.json / directory). Several ``--prompt`` options, or
``--num-samples``, form one batch of rows of different lengths (no row depends on another); the
prompt is prefilled with the model's sequence backend, then tokens are decoded with the step kernel,
``--block-size`` per device call, and a single row is printed as its tokens arrive. Greedy
(``--greedy`` or ``--temperature 0``) or temperature / top-k sampling; a row stops at the model's
end-of-sequence token. The header goes to stdout, timings to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from xlstm_jax.tools.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xlstm-jax generate``."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--run-dir", default=None, help="run directory written by `xlstm-jax train` (default: runs/default)")
    src.add_argument("--model", default=None, metavar="DIR",
                     help="a transformers xLSTMForCausalLM checkpoint directory (config.json + safetensors) (default: none, use --run-dir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of --run-dir (default: the newest)")
    parser.add_argument("--tokenizer", default=None,
                        help="'bytes', or a tokenizer.json / directory with one (default: the model's own)")
    parser.add_argument("--no-bos", action="store_true", help="do not start prompts with the tokenizer's BOS token")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue; repeat for a batch of prompts (default: 'The ')")
    parser.add_argument("--max-new-tokens", type=int, default=300, help="tokens to generate per row (default: 300)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0: greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens, 0: all (default: 40)")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--seed", type=int, default=0, help="seed of row 0; row b uses seed + b (default: 0)")
    parser.add_argument("--num-samples", type=int, default=1, help="continuations per prompt (default: 1)")
    parser.add_argument("--backend", default=None, help="prefill backend (default: the run's / the platform's)")
    parser.add_argument("--step-kernel", default=None, help="decode step kernel (default: the run's / recurrent_native)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="parameter and compute dtype of --model (default: the checkpoint's)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens decoded per device call (default: 16)")
    parser.add_argument("--no-eos", action="store_true", help="do not stop rows at the end-of-sequence token")


def load_run(run_dir: str, step: int | None = None, backend: str | None = None, step_kernel: str | None = None):
    """(model, params, config, step) of a run directory, on one device."""
    import jax

    from xlstm_jax.models.xlstm_lm import xLSTMLMConfig, xLSTMLMModel
    from xlstm_jax.models.xlstm_lm.model import init_params
    from xlstm_jax.train.checkpoint import CONFIG_FILE, CheckpointStore, abstract_like, read_json

    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise UsageError(f"--run-dir {run_dir!r} is not a run directory (no {CONFIG_FILE}); train one with `xlstm-jax train`")
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
        store.close()
        raise UsageError(f"no checkpoint {'' if step is None else step} in {store.directory}; steps: {store.all_steps()}")
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    params, _ = store.restore_params(step, abstract_like(abstract, jax.tree.map(lambda _: dev, abstract)))
    store.close()
    return xLSTMLMModel(config), params, config, step


def _run_tokenizer(run_dir: str) -> str:
    """The tokenizer a run trained with: its config.json's "tokenizer" ("bytes", or the path of a
    tokenizer.json / directory that `train --tokenizer` recorded); "bytes" when absent."""
    from xlstm_jax.train.checkpoint import CONFIG_FILE, read_json

    spec = read_json(os.path.join(run_dir, CONFIG_FILE)).get("tokenizer", "bytes")
    return spec if isinstance(spec, str) and spec else "bytes"


def _check_args(args: argparse.Namespace) -> None:
    from xlstm_jax.kernels import available_mlstm_step_kernels
    from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import available_mlstm_backends

    for name, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--num-samples", args.num_samples, 1),
                             ("--top-k", args.top_k, 0), ("--block-size", args.block_size, 1), ("--seed", args.seed, 0)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}; got {value}")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise UsageError(f"--temperature must be a finite number >= 0; got {args.temperature}")
    if args.backend is not None and args.backend not in available_mlstm_backends():
        raise UsageError(f"--backend {args.backend!r} is unknown; backends: {', '.join(available_mlstm_backends())}")
    if args.step_kernel is not None and args.step_kernel not in available_mlstm_step_kernels():
        raise UsageError(
            f"--step-kernel {args.step_kernel!r} is unknown; step kernels: {', '.join(available_mlstm_step_kernels())}"
        )
    if args.model is not None and not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model!r} is not a directory")
    if args.model is not None and args.step is not None:
        raise UsageError("--step applies to --run-dir only")
    if args.model is None and args.dtype is not None:
        raise UsageError("--dtype applies to --model only (a run keeps its training dtypes)")


def run(args: argparse.Namespace) -> int:
    """Generate and print text."""
    import numpy as np

    from xlstm_jax.models.xlstm_lm import Generator, load_pretrained
    from xlstm_jax.text import StreamDecoder, load_tokenizer

    _check_args(args)
    prompts_text = args.prompt or ["The "]
    if args.model is not None:
        try:
            model, params = load_pretrained(
                args.model, dtype=args.dtype, backend=args.backend, step_kernel=args.step_kernel, unrolled=True,
            )
        except ValueError as err:
            raise UsageError(f"--model {args.model}: {err}") from err
        config, source = model.config, f"# {args.model}"
        tok_default_dir = args.model
    else:
        run_dir = args.run_dir or "runs/default"
        model, params, config, step = load_run(run_dir, args.step, args.backend, args.step_kernel)
        source, tok_default_dir = f"# {run_dir} step {step}", None
    tok_spec = args.tokenizer
    if tok_spec is None and args.model is None:
        tok_spec = _run_tokenizer(run_dir)
    try:
        tok = load_tokenizer(tok_spec, model_dir=tok_default_dir, add_bos=False if args.no_bos else None)
    except (ValueError, ImportError) as err:
        raise UsageError(f"--tokenizer: {err}") from err
    if tok.vocab_size > config.vocab_size:
        raise UsageError(
            f"tokenizer {tok.name} has {tok.vocab_size} tokens; the model's vocabulary is {config.vocab_size}"
        )
    encoded = [np.asarray(tok.encode(t), np.int32) for t in prompts_text]
    if any(ids.size == 0 for ids in encoded):
        raise UsageError("--prompt must not be empty (it encodes to no tokens)")
    rows = [ids for ids in encoded for _ in range(args.num_samples)]
    texts = [t for t in prompts_text for _ in range(args.num_samples)]
    temperature = 0.0 if args.greedy else args.temperature
    eos = None if args.no_eos else config.eos_token_id
    gen = Generator(model, params, block_size=args.block_size)
    print(
        f"{source}: prefill {config.mlstm_backend}, decode {config.mlstm_step_kernel}, tokenizer {tok.name}, "
        f"{'greedy' if temperature == 0 else f'temperature {temperature}, top-k {args.top_k}'}; "
        f"{len(rows)} row(s)"
    )
    stream = len(rows) == 1
    decoder = StreamDecoder(tok)
    first_at = None
    t0 = time.perf_counter()
    if stream:
        print("-" * 72)
        sys.stdout.write(texts[0])
        sys.stdout.flush()

    def on_tokens(row: int, toks) -> None:
        nonlocal first_at
        first_at = first_at or time.perf_counter()
        if stream:
            sys.stdout.write(decoder.feed(toks))
            sys.stdout.flush()

    outs = gen.generate(
        rows, args.max_new_tokens, temperature=temperature, top_k=args.top_k,
        seeds=[args.seed + b for b in range(len(rows))], eos_token_id=eos, on_tokens=on_tokens,
    )
    dt = time.perf_counter() - t0
    if stream:
        sys.stdout.write(decoder.flush() + "\n")
    else:
        for text, out in zip(texts, outs):
            print("-" * 72)
            print(text + tok.decode(out))
    sys.stdout.flush()
    n = sum(len(o) for o in outs)
    ttft = (first_at - t0) if first_at else float("nan")
    print(
        f"# {n} tokens in {dt:.2f} s (first token after {ttft:.2f} s, compilation included)", file=sys.stderr
    )
    return 0
