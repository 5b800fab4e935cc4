"""Training: tokenizer, corpus and batches, the schedule, one-step training, the progress text,
interrupt-and-resume losing no step, the CLI commands."""

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
from xlstm_jax.train.run import RunLog, prepare_run_dir, progress_text, train
from xlstm_jax.train.tokenizer import ByteTokenizer
from xlstm_jax.train.trainer import TrainConfig, Trainer, make_schedule


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
    (tmp_path / "latin1.txt").write_bytes("Größe\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt' is not UTF-8 text \(invalid byte 0xf6 at byte offset 2\)"):
        load_corpus([str(tmp_path / "latin1.txt")])
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus([str(tmp_path / "empty.txt")])
    with pytest.raises(ValueError, match="not a regular file"):
        load_corpus([str(tmp_path)])


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
    # one process's rows of a batch: the same rows of the whole batch, the same next state
    full, after = sampler.batch(DataState(0, 2))
    rows, after_rows = sampler.batch(DataState(0, 2), slice(1, 3))
    np.testing.assert_array_equal(rows, full[1:3])
    assert after_rows == after
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


def test_schedule_trains_from_the_first_update():
    """Warm-up counts updates from 1: the first update has a nonzero rate, also when the run is
    shorter than the warm-up; the peak at the last warm-up update; the cosine ends at min_lr_ratio."""
    tc = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-2, min_lr_ratio=0.1)
    lr = make_schedule(tc)
    rates = np.array([float(lr(c)) for c in range(100)])
    np.testing.assert_allclose(rates[:10], 1e-2 * np.arange(1, 11) / 10, rtol=1e-6)
    np.testing.assert_allclose(rates[99], 1e-3, rtol=1e-6)  # update 100 = steps
    assert np.all(np.diff(rates[9:]) < 0) and rates[10] < 1e-2
    short = make_schedule(TrainConfig(steps=1, warmup_steps=50, learning_rate=3e-3))
    assert float(short(0)) == pytest.approx(3e-3 / 50, rel=1e-6)
    no_warmup = make_schedule(TrainConfig(steps=4, warmup_steps=0, learning_rate=1e-2))
    assert 0 < float(no_warmup(0)) < 1e-2 and float(no_warmup(3)) == pytest.approx(1e-3, rel=1e-6)


def test_one_step_run_changes_every_parameter():
    """A run of one step (shorter than the warm-up) trains: every parameter leaf moves."""
    model = preset_config("tiny", context_length=16, mlstm_backend_kwargs={"chunk_size": 16})
    trainer = Trainer(model, TrainConfig(steps=1, warmup_steps=50, batch_size=2))
    state = trainer.init_state()
    before = jax.device_get(state.params)
    batch = np.random.default_rng(0).integers(0, 256, size=(2, 17)).astype(np.int32)
    state, metrics = trainer.train_step(state, batch)
    after = jax.device_get(state.params)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    flat_before = jax.tree_util.tree_leaves_with_path(before)
    flat_after = jax.tree.leaves(after)
    unchanged = [jax.tree_util.keystr(path) for (path, a), b in zip(flat_before, flat_after) if np.array_equal(a, b)]
    assert not unchanged, f"parameters not updated by the first step: {unchanged}"
    for (path, a), b in zip(flat_before, flat_after):
        assert np.all(np.isfinite(b)), jax.tree_util.keystr(path)


def test_progress_text_shows_only_known_figures(tmp_path):
    """Before the first logged loss the bar shows no loss (and never 'nan')."""
    assert progress_text(None, None, None) == ""
    assert progress_text(float("nan"), float("nan"), None) == ""
    assert progress_text(None, 5.5, None) == "eval 5.500"
    assert progress_text(1.25, None, 1234.0) == "loss 1.250  1,234 tok/s"
    log = RunLog(str(tmp_path), progress=True, print_fn=lambda s: None)
    log.start(total=3, initial=0, resumed_from=None)
    try:
        log.eval_row(0, 5.0)  # the evaluation at step 0 comes before any training loss
        shown = str(log._bar.postfix)
        assert "eval 5.000" in shown and "loss" not in shown and "nan" not in shown
        log.train_rows([{"step": 1, "loss": 4.0, "grad_norm": 1.0, "lr": 0.1}], 100.0)
        assert "loss 4.000" in str(log._bar.postfix)
    finally:
        log.close()
    with open(os.path.join(tmp_path, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert rows == [{"step": 0, "kind": "eval", "loss": 5.0},
                    {"step": 1, "kind": "train", "loss": 4.0, "grad_norm": 1.0, "lr": 0.1}]


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
