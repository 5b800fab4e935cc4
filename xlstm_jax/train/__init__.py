"""Training of the xLSTM language model: byte tokenizer, embedded corpus, resumable trainer."""

from .data import BatchSampler, DataState, load_corpus, split_corpus, unigram_entropy
from .tokenizer import ByteTokenizer
from .trainer import TrainConfig, Trainer, TrainState, train

__all__ = [
    "BatchSampler",
    "ByteTokenizer",
    "DataState",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "load_corpus",
    "split_corpus",
    "train",
    "unigram_entropy",
]
