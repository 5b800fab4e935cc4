"""Run directories and Orbax checkpoints.

A run directory holds::

    config.json        {"model": xLSTMLMConfig.to_dict(), "train": TrainConfig.to_dict(), "tokenizer": "bytes"}
    checkpoints/<step> Orbax checkpoint with three items:
                         params       the model parameters (all a generator needs)
                         train_state  {"step", "opt_state", "rng"}
                         meta         JSON: step, data iterator state, corpus description
    metrics.jsonl      one JSON line per training step (loss, grad norm, lr) and per evaluation
    summary.json       figures of the last run segment (losses, unigram entropy, tokens/s, memory)

Parameters are saved with their sharding and can be restored onto any other mesh or one device
(Orbax reshards to the target's sharding).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (temp file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    """Read a JSON file."""
    with open(path) as fh:
        return json.load(fh)


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """``ShapeDtypeStruct`` leaves (with ``shardings`` if given) describing ``tree``."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class _DropMessages(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class CheckpointStore:
    """Synchronous Orbax checkpoints of one run: ``save``, ``latest_step``, ``restore``, ``restore_params``."""

    def __init__(self, run_dir: str, max_to_keep: int | None = 2, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
        if read_only and not os.path.isdir(self.directory):
            raise ValueError(f"no checkpoints in {run_dir!r} (expected the folder {self.directory})")
        if read_only:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None, save_interval_steps=0, create=False, read_only=True,
                enable_async_checkpointing=False,
            )
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
            )
        absl_logger = logging.getLogger("absl")
        quiet = _DropMessages("directory is read only")
        absl_logger.addFilter(quiet)  # Orbax warns that a read-only manager is read-only
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_logger.removeFilter(quiet)

    def all_steps(self) -> list[int]:
        """Steps that have a complete checkpoint, ascending."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, params: Any, train_state: dict[str, Any], meta: dict[str, Any]) -> bool:
        """Save (blocking) unless ``step`` is already saved; True if it wrote a checkpoint."""
        if step in self.manager.all_steps():
            return False
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                train_state=ocp.args.StandardSave(train_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        return True

    def restore(self, step: int, abstract_params: Any, abstract_train_state: Any) -> tuple[Any, Any, dict]:
        """(params, train_state, meta) of checkpoint ``step``, placed as the abstract targets say."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                train_state=ocp.args.StandardRestore(abstract_train_state),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["params"], out["train_state"], dict(out["meta"])

    def restore_params(self, step: int, abstract_params: Any) -> tuple[Any, dict]:
        """Only the parameters (and meta) of checkpoint ``step``: what generation needs."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()
            ),
        )
        return out["params"], dict(out["meta"])

    def close(self) -> None:
        """Finish pending work and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
