"""Training of the xLSTM language model, by job:

- ``config``: ``TrainConfig`` (the run's settings) and ``check_run_settings`` (settings that depend
  on the model config and the machine);
- ``data``: the byte corpus, its split, resumable batches (``BatchSampler``, ``DataState``) and
  ``prepare_data``;
- ``trainer``: ``TrainState``, the schedule and AdamW optimizer, the loss, the jitted train and
  eval steps and their shardings (``Trainer``);
- ``run``: the job: run directory, the loop with its log, checkpoints and graceful stop (``train``);
- ``checkpoint``: Orbax checkpoints and the run-directory files; ``tokenizer``: bytes; ``plot``.
"""

from .config import TrainConfig, check_run_settings
from .data import BatchSampler, DataState, RunData, load_corpus, prepare_data, split_corpus, unigram_entropy
from .run import prepare_run_data, prepare_run_dir, train
from .tokenizer import ByteTokenizer
from .trainer import Trainer, TrainState

__all__ = [
    "BatchSampler",
    "ByteTokenizer",
    "DataState",
    "RunData",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "check_run_settings",
    "load_corpus",
    "prepare_data",
    "prepare_run_data",
    "prepare_run_dir",
    "split_corpus",
    "train",
    "unigram_entropy",
]
