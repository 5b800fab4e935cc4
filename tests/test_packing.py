"""Training packs documents (issue 11): documents and segment ids, packed windows, the masked loss,
a packed train step and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_jax.models.xlstm_lm.config import preset_config
from xlstm_jax.train.config import TrainConfig
from xlstm_jax.train.data import BatchSampler, DataState, load_corpus, load_documents, prepare_data
from xlstm_jax.train.packing import masked_lm_loss, segment_stream, split_batch
from xlstm_jax.train.trainer import Trainer


def test_documents_and_segment_ids(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one<d>two<d><d>three")
    b.write_text("four")
    tokens, seg, _ = load_documents([str(a), str(b)])
    assert bytes(tokens).decode() == "one<d>two<d><d>three\n\nfour"
    assert seg.tolist() == [0] * len("one<d>two<d><d>three\n\n") + [1] * 4
    tokens, seg, _ = load_documents([str(a), str(b)], doc_separator="<d>")
    text = bytes(tokens).decode()
    assert text == "one\n\ntwo\n\nthree\n\nfour"
    ids = {ch_i: seg[ch_i] for ch_i in range(len(text))}
    assert [ids[text.index(w)] for w in ("one", "two", "three", "four")] == [0, 1, 2, 3]
    assert np.all(np.diff(seg) >= 0) and seg[-1] == 3
    with pytest.raises(ValueError, match="doc_separator must be a non-empty string"):
        load_documents([str(a)], doc_separator="")
    # the embedded corpus: one document per topic, the same tokens as unpacked
    tokens, seg, _ = load_documents()
    assert np.array_equal(tokens, load_corpus()[0]) and seg[-1] + 1 > 10
    assert segment_stream([2, 0, 3]).tolist() == [0, 0, 2, 2, 2]


def test_packed_windows_carry_their_segment_ids():
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    seg = segment_stream(np.random.default_rng(1).integers(1, 60, 400))[:5000]
    sampler = BatchSampler(tokens, 4, 32, seed=3, segments=seg)
    batch, _ = sampler.batch(DataState(0, 2))
    assert batch.shape == (4, 2, 33) and batch.dtype == np.int32
    for row, s in zip(batch, sampler._epoch_starts(0)[8:12]):
        assert np.array_equal(row[0], tokens[s:s + 33]) and np.array_equal(row[1], seg[s:s + 33])
    unpacked, _ = BatchSampler(tokens, 4, 32, seed=3).batch(DataState(0, 2))
    assert np.array_equal(unpacked, batch[:, 0])


def test_masked_loss_keeps_targets_inside_documents():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 7, (2, 9)).astype(np.int32)
    seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5] * 9], np.int32)
    inputs, targets, seg_in, mask = split_batch(jnp.asarray(np.stack([tokens, seg], axis=1)))
    assert np.array_equal(seg_in, seg[:, :-1])
    assert np.asarray(mask).tolist()[0] == [True, True, False, True, False, True, True, True]
    logits = jnp.asarray(rng.normal(size=(2, 8, 7)))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    keep = [(b, t) for b in range(2) for t in range(8) if seg[b, t + 1] == seg[b, t]]
    want = -np.mean([logp[b, t, tokens[b, t + 1]] for b, t in keep])
    np.testing.assert_allclose(float(masked_lm_loss(logits, targets, mask)), want, rtol=1e-6)
    i2, t2, s2, m2 = split_batch(jnp.asarray(tokens))
    assert s2 is None and m2 is None and np.array_equal(t2, tokens[:, 1:])


def test_packed_train_step_and_eval():
    model = preset_config("tiny", context_length=16, mlstm_backend_kwargs={"chunk_size": 16})
    data = prepare_data((), batch_size=2, seq_len=16, seed=0, heldout_fraction=0.05, eval_batches=1, pack=True)
    batch, _ = data.sampler.batch(DataState())
    assert batch.shape == (2, 2, 17) and data.num_documents > 10
    trainer = Trainer(model, TrainConfig(steps=1, batch_size=2, pack=True))
    assert trainer.batch_shape == (2, 2, 17)
    state = trainer.init_state()
    # a batch whose every row changes document in the middle
    batch[:, 1, 9:] = batch[:, 1, :9].max() + 1
    state, metrics = trainer.train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert np.isfinite(trainer.eval_loss(state.params, data.eval_batches))
    with pytest.raises(ValueError, match="pack must be a bool"):
        TrainConfig(pack="yes")


def test_cli_options_of_packing_and_the_input_gate():
    import argparse

    from xlstm_jax.tools import train_cmd
    from xlstm_jax.tools.errors import UsageError

    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    model, tc = train_cmd.build_configs(parser.parse_args(["--preset", "tiny", "--backend", "fwbw_stabilized"]))
    assert tc.pack is True and tc.doc_separator is None and model.input_gate == "exp"
    args = parser.parse_args(["--preset", "tiny", "--backend", "fwbw_stabilized", "--no-pack",
                              "--doc-separator", "\\n\\n\\n", "--input-gate", "sigmoid"])
    model, tc = train_cmd.build_configs(args)
    assert tc.pack is False and tc.doc_separator == "\n\n\n" and model.input_gate == "sigmoid"
    with pytest.raises(UsageError, match="--doc-separator must not be empty"):
        train_cmd.build_configs(parser.parse_args(["--preset", "tiny", "--doc-separator", ""]))
