"""Training: tokenizer, corpus and batches, interrupt-and-resume losing no step, the CLI commands."""

import dataclasses
import json
import math
import os
import signal

import jax
import numpy as np
import pytest

from xlstm_jax import cli
from xlstm_jax.models.xlstm_lm import preset_config
from xlstm_jax.train.checkpoint import CheckpointStore, read_json
from xlstm_jax.train.data import (
    BatchSampler,
    DataState,
    embedded_corpus_text,
    heldout_batches,
    load_corpus,
    split_corpus,
    unigram_entropy,
)
from xlstm_jax.train.tokenizer import ByteTokenizer
from xlstm_jax.train.trainer import TrainConfig, Trainer, prepare_run_dir, train


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "mLSTM: C_t = f C_{t-1} + i k v^T  (Größe, 記憶, ∑)\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([0xE8, 0xA8]) == "\ufffd"  # a cut multi-byte character decodes, replaced
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([256])


def test_embedded_corpus_split_and_unigram_entropy():
    text = embedded_corpus_text()
    assert len(text) > 100_000 and "the" in text and "def" in text
    tokens, source = load_corpus()
    train_part, heldout = split_corpus(tokens, 0.05)
    assert len(train_part) + len(heldout) == len(tokens)
    assert 0.04 < len(heldout) / len(tokens) < 0.06 and train_part[-1] == ord("\n")
    h = unigram_entropy(train_part)
    assert 2.5 < h < 4.0  # English bytes: about 4.5-5 bits
    assert unigram_entropy(np.array([0, 1, 2, 3] * 10)) == pytest.approx(math.log(4))


def test_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.txt").write_text("second file\n")
    tokens, source = load_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    assert ByteTokenizer().decode(tokens) == "hello world\n\n\nsecond file\n" and "a.txt" in source
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus([str(tmp_path / "missing.txt")])


def test_batch_sampler_is_deterministic_and_resumable():
    tokens = np.arange(5000) % 251
    sampler = BatchSampler(tokens, batch_size=4, seq_len=32, seed=3)
    per_epoch = sampler.batches_per_epoch(0)
    state, seen = DataState(), []
    for _ in range(per_epoch + 3):  # crosses into the next epoch
        batch, state = sampler.batch(state)
        seen.append(batch)
    assert state.epoch == 1 and state.position == 3
    assert seen[0].shape == (4, 33) and seen[0].dtype == np.int32
    # windows are contiguous slices of the text
    assert all(np.all(np.diff(row) % 251 == 1) for row in seen[0])
    # a fresh sampler resumed from a saved state continues identically
    resumed = BatchSampler(tokens, batch_size=4, seq_len=32, seed=3)
    state2 = DataState.from_dict(json.loads(json.dumps(DataState(0, 5).to_dict())))
    for expected in seen[5:]:
        batch, state2 = resumed.batch(state2)
        np.testing.assert_array_equal(batch, expected)
    # epochs differ in order; other seeds differ
    assert not np.array_equal(seen[0], seen[per_epoch])
    assert not np.array_equal(BatchSampler(tokens, 4, 32, seed=4).batch(DataState())[0], seen[0])
    assert len(heldout_batches(tokens, 4, 32, 3)) == 3
    with pytest.raises(ValueError, match="too short"):
        BatchSampler(tokens[:100], 4, 32)


def _tiny(tmp_path, name, **kw):
    model = preset_config("tiny", context_length=24, mlstm_backend_kwargs={"chunk_size": 16})
    settings = dict(steps=6, batch_size=4, warmup_steps=2, eval_every=0, eval_batches=1, checkpoint_every=0, log_every=2)
    tc = TrainConfig(out_dir=str(tmp_path / name), **{**settings, **kw})
    return model, tc


def _train_log(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def _final_params(model, tc):
    store = CheckpointStore(tc.out_dir, read_only=True)
    params, rest = Trainer(model, tc).abstract_train_state()
    out = store.restore(store.latest_step(), params, rest)
    store.close()
    return out


def test_interrupt_and_resume_lose_no_step(tmp_path):
    """Ctrl-C (a real SIGINT) stops after the current step and checkpoints it; a crash resumes from the
    last periodic checkpoint; either way the resumed run equals the uninterrupted one bit for bit:
    same per-step losses (each step logged once), same parameters, optimizer state, RNG, data position."""
    model, tc_ref = _tiny(tmp_path, "ref")
    ref = train(model, tc_ref, progress=False, print_fn=lambda s: None)
    assert ref["step"] == 6 and not ref["interrupted"]

    model, tc = _tiny(tmp_path, "run")

    def sigint_at_2(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    part1 = train(model, tc, progress=False, on_step=sigint_at_2, print_fn=lambda s: None)
    assert part1["interrupted"] and part1["step"] == 2
    assert CheckpointStore(tc.out_dir, read_only=True).all_steps() == [2]

    class Crash(Exception):
        pass

    def crash_at_6(step, metrics):
        if step == 6:
            raise Crash  # steps 5 and 6 ran, step 5 was logged, neither was checkpointed

    model, tc_crash = _tiny(tmp_path, "run", checkpoint_every=2, log_every=1)  # checkpoint at 4
    with pytest.raises(Crash):
        train(model, tc_crash, progress=False, on_step=crash_at_6, print_fn=lambda s: None)
    assert max(s for s, _ in _train_log(tc.out_dir)) == 5
    assert CheckpointStore(tc.out_dir, read_only=True).all_steps() == [2, 4]
    part3 = train(model, tc, progress=False, print_fn=lambda s: None)  # resumes from step 4
    assert part3["step"] == 6 and not part3["interrupted"]

    log, log_ref = _train_log(tc.out_dir), _train_log(tc_ref.out_dir)
    assert [s for s, _ in log] == [1, 2, 3, 4, 5, 6]
    assert log == log_ref  # identical losses at every step
    params, rest, meta = _final_params(model, tc)
    params_ref, rest_ref, meta_ref = _final_params(model, tc_ref)
    jax.tree.map(np.testing.assert_array_equal, (params, rest), (params_ref, rest_ref))
    assert meta["data_state"] == meta_ref["data_state"] and meta["step"] == 6


def test_resume_refuses_a_different_run(tmp_path):
    model, tc = _tiny(tmp_path, "run")
    prepare_run_dir(model, tc)
    prepare_run_dir(model, dataclasses.replace(tc, steps=10, log_every=5))  # may extend / relog
    with pytest.raises(ValueError, match="different config"):
        prepare_run_dir(model.replace(num_blocks=3), tc)
    with pytest.raises(ValueError, match="batch_size"):
        prepare_run_dir(model, dataclasses.replace(tc, batch_size=8))
    prepare_run_dir(model.replace(num_blocks=3), tc, overwrite=True)
    assert read_json(os.path.join(tc.out_dir, "config.json"))["model"]["num_blocks"] == 3


def test_cli_train_sharded_then_generate(tmp_path, capsys):
    """`xlstm-jax train` on a (2, 1, 2) mesh of simulated devices writes a sharded checkpoint;
    `xlstm-jax generate` restores it on one device and prints text after the prompt."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py simulates 8 on CPU)")
    run_dir = str(tmp_path / "cli")
    rc = cli.main([
        "train", "--preset", "tiny", "--steps", "3", "--batch-size", "4", "--eval-batches", "1",
        "--out-dir", run_dir, "--no-progress", "--mesh", "2,1,2", "--backend-option", "chunk_size=16",
        "--log-every", "1",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "unigram entropy" in out and "held-out loss" in out
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["step"] == 3 and summary["mesh"] == [2, 1, 2] and len(summary["devices"]) == 4
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["model"]["mlstm_backend_kwargs"] == {"chunk_size": 16}
    rc = cli.main(["generate", "--run-dir", run_dir, "--prompt", "The ", "--max-new-tokens", "12", "--seed", "1"])
    assert rc == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith(f"# {run_dir} step 3") and text[-1].startswith("The ")
    assert len(text[-1].encode("utf-8", errors="surrogateescape")) >= len("The ") + 1
