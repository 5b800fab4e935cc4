"""Plot a run's loss curve: ``python -m xlstm_jax.train.plot RUN_DIR OUT.png``.

Reads ``metrics.jsonl`` (per-step training loss, held-out evaluations) and ``summary.json`` (unigram
entropy) of a run directory. Needs matplotlib, which the package itself does not depend on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .checkpoint import METRICS_FILE, SUMMARY_FILE, read_json
from .data import bits_per_byte


def load_metrics(run_dir: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) lists of (step, loss in nats/byte) of a run directory."""
    train, evals = [], []
    with open(os.path.join(run_dir, METRICS_FILE)) as fh:
        for line in fh:
            row = json.loads(line)
            (train if row["kind"] == "train" else evals).append((row["step"], row["loss"]))
    return train, evals


def plot_run(run_dir: str, out_path: str, smooth: int = 10) -> None:
    """Write a PNG of training loss (moving average over ``smooth`` steps), held-out loss and the
    unigram entropy, in bits per byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    train, evals = load_metrics(run_dir)
    summary = read_json(os.path.join(run_dir, SUMMARY_FILE))
    steps = np.array([s for s, _ in train])
    loss = np.array([bits_per_byte(v) for _, v in train])
    k = max(1, min(smooth, len(loss)))
    avg = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    ax.plot(steps[k - 1 :], avg, color="tab:blue", lw=1.6, label=f"train ({k}-step mean)")
    if evals:
        ax.plot([s for s, _ in evals], [bits_per_byte(v) for _, v in evals], "o-", color="tab:red", label="held-out")
    ax.axhline(summary["unigram_entropy_bits"], color="gray", ls="--", label="unigram entropy of the corpus")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (bits per byte)")
    top = max([6.0] + [float(v) for v in loss] + [bits_per_byte(v) for _, v in evals])
    ax.set_ylim(0, 1.04 * top)
    ax.set_title(f"xLSTM LM, {summary['num_params']:,} parameters, {summary['corpus']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: RUN_DIR OUT.png [--smooth N]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--smooth", type=int, default=10)
    args = parser.parse_args(argv)
    plot_run(args.run_dir, args.out, args.smooth)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
