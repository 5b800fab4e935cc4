"""Fine-tuning from a transformers checkpoint: ``xlstm-jax train --init-from DIR [--tokenizer ...]``.

A small random transformers ``xLSTMForCausalLM`` (every parameter re-drawn at random), saved by
transformers with a tiny BPE ``tokenizer.json`` (built here with the ``tokenizers`` library) and a
``tokenizer_config.json`` asking for BOS: the loss of the first step equals the loss of the
transformers model itself (float64, PyTorch) on the same batch; every parameter moves; the run
records its tokenizer and generates with it; a resumed fine-tuning run equals the uninterrupted one
bit for bit; the initial parameters land on a mesh as the trainer shards them; user errors exit with status 2 before any run
directory exists.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.models.test_hf_tokenizer_cli import TEXTS, _write_tokenizer  # noqa: E402
from tests.models.test_hf_xlstm import _randomize  # noqa: E402
from xlstm_jax import cli  # noqa: E402
from xlstm_jax.models.xlstm_lm import load_pretrained  # noqa: E402
from xlstm_jax.models.xlstm_lm.hf import read_pretrained_config  # noqa: E402
from xlstm_jax.testing import assert_close  # noqa: E402
from xlstm_jax.text import load_tokenizer  # noqa: E402
from xlstm_jax.tools.generate_cmd import load_run  # noqa: E402
from xlstm_jax.train import TrainConfig  # noqa: E402
from xlstm_jax.train.checkpoint import CheckpointStore, read_json  # noqa: E402
from xlstm_jax.train.data import DataState, load_corpus, prepare_data  # noqa: E402
from xlstm_jax.train.trainer import Trainer  # noqa: E402

TOL = 1e-5  # float32 forward against the float64 transformers reference
VOCAB = 384  # the tokenizer has 320 tokens: the model's vocabulary is padded beyond it
BATCH, SEQ = 2, 32
TRAIN = ["--batch-size", str(BATCH), "--seq-len", str(SEQ), "--eval-every", "0", "--eval-batches", "0",
         "--log-every", "1", "--lr", "1e-2", "--warmup-steps", "1", "--no-progress",
         "--backend", "fwbw_stabilized", "--backend-option", "chunk_size=16", "--dtype", "float32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, text file, transformers model in float64) of a random checkpoint saved by
    transformers, with its tokenizer.json and a tokenizer_config.json that asks for BOS."""
    root = tmp_path_factory.mktemp("finetune")
    cfg = transformers.xLSTMConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_heads=2, chunk_size=16)
    model = transformers.xLSTMForCausalLM(cfg).eval()
    _randomize(model, seed=11)
    path = str(root / "hf")
    model.save_pretrained(path)
    _write_tokenizer(path, tokenizer_config={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": True})
    text = root / "text.txt"
    text.write_text("\n\n".join(TEXTS * 6))
    return path, str(text), model.double()


def _train(out_dir, ckpt, text, steps, *extra):
    return cli.main(["train", "--init-from", ckpt, "--data", text, "--out-dir", str(out_dir), "--steps", str(steps),
                     *TRAIN, *extra])


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return {row["step"]: row["loss"] for row in map(json.loads, fh) if row["kind"] == "train"}


def _reference_loss(model, batch: np.ndarray) -> float:
    """Mean next-token cross entropy of the transformers model (float64) on ``batch`` (B, S + 1)."""
    ids = torch.as_tensor(batch, dtype=torch.long)
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.fixture(scope="module")
def run(checkpoint, tmp_path_factory):
    """A two-step fine-tuning run from the checkpoint (its tokenizer by default)."""
    ckpt, text, _ = checkpoint
    out = tmp_path_factory.mktemp("runs") / "ft"
    assert _train(out, ckpt, text, 2) == 0
    return str(out)


def test_first_loss_is_the_checkpoints_and_every_parameter_moves(checkpoint, run, capsys):
    ckpt, text, hf_model = checkpoint
    record = read_json(os.path.join(run, "config.json"))
    assert record["tokenizer"] == os.path.abspath(ckpt) == record["train"]["tokenizer"]
    assert record["train"]["init_from"] == os.path.abspath(ckpt)
    # the batch of step 1, from the corpus encoded with the checkpoint's tokenizer (BOS first)
    tok = load_tokenizer(ckpt)
    tokens, _ = load_corpus([text], tok.encode)
    assert tokens[0] == 0 and tok.vocab_size == 320 and tokens.max() < 320
    data = prepare_data([text], batch_size=BATCH, seq_len=SEQ, seed=0, heldout_fraction=0.05, eval_batches=0,
                        vocab_size=VOCAB, encode=tok.encode)
    batch, _ = data.sampler.batch(DataState())
    losses = _losses(run)
    assert sorted(losses) == [1, 2]
    assert_close(np.float64(losses[1]), np.float64(_reference_loss(hf_model, batch)), TOL, "loss at step 1")

    config = read_pretrained_config(ckpt, backend="fwbw_stabilized", backend_kwargs={"chunk_size": 16}, param_dtype="float32")
    _, init = load_pretrained(ckpt, config=config)
    _, trained, _, step = load_run(run)
    assert step == 2
    flat_init = jax.tree_util.tree_leaves_with_path(init)
    flat_trained = jax.tree.leaves(trained)
    assert len(flat_init) == len(flat_trained)
    for (path, a), b in zip(flat_init, flat_trained):
        assert a.shape == b.shape
        assert np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() > 0, jax.tree_util.keystr(path)

    # the run's checkpoint generates, with the recorded tokenizer
    capsys.readouterr()
    assert cli.main(["generate", "--run-dir", run, "--prompt", "The quick", "--max-new-tokens", "6", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert f"tokenizer tokenizer.json ({os.path.basename(ckpt)})" in out and "The quick" in out


def test_resumed_finetuning_equals_the_uninterrupted_run(checkpoint, run, tmp_path):
    """A fine-tuning run that crashed after step 2 (checkpoint at step 1) and was started again
    with the same command equals the uninterrupted run bit for bit (the checkpoint of --init-from
    is not read again: the run continues from its own checkpoint)."""
    from xlstm_jax.cli import build_parser
    from xlstm_jax.tools.train_cmd import build_configs
    from xlstm_jax.train.run import train

    ckpt, text, _ = checkpoint
    out = tmp_path / "resumed"
    argv = ["train", "--init-from", ckpt, "--data", text, "--out-dir", str(out), "--steps", "2", *TRAIN]

    class Crash(Exception):
        pass

    def crash_at_2(step, metrics):
        if step == 2:
            raise Crash

    model_config, tc = build_configs(build_parser().parse_args(argv + ["--checkpoint-every", "1"]))
    with pytest.raises(Crash):
        train(model_config, tc, progress=False, on_step=crash_at_2, print_fn=lambda s: None)
    assert CheckpointStore(str(out), read_only=True).all_steps() == [1]
    assert cli.main(argv) == 0  # resumes at step 1
    assert _losses(str(out)) == _losses(run)
    _, p, _, _ = load_run(str(out))
    _, p_ref, _, _ = load_run(run)
    jax.tree.map(np.testing.assert_array_equal, p, p_ref)


def test_initial_parameters_on_a_mesh(checkpoint):
    """init_state(params=load_pretrained(mesh=trainer.mesh)): sharded as the trainer shards, the
    checkpoint's values, the seed's training RNG; parameters of another dtype are refused."""
    ckpt, _, _ = checkpoint
    config = read_pretrained_config(ckpt, backend="fwbw_stabilized", backend_kwargs={"chunk_size": 16}, param_dtype="float32")
    tc = TrainConfig(batch_size=BATCH, seq_len=SEQ, mesh=(1, 2, 2), tokenizer=os.path.abspath(ckpt))
    trainer = Trainer(config, tc)
    _, params = load_pretrained(ckpt, config=config, mesh=trainer.mesh)
    _, host = load_pretrained(ckpt, config=config)
    state = trainer.init_state(params=params)
    for x, sh, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(trainer.state_shardings.params), jax.tree.leaves(host)):
        assert x.sharding.is_equivalent_to(sh, x.ndim)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref))
    _, k_train = jax.random.split(jax.random.key(tc.seed))  # the training RNG of a fresh run of the seed
    np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(jax.random.key_data(k_train)))
    assert int(state.step) == 0
    with pytest.raises(ValueError, match="shape or dtype"):
        trainer.init_state(params=jax.tree.map(lambda x: np.zeros(x.shape, np.float16), host))


def _usage_error(capsys, argv) -> str:
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xlstm-jax: error: ")
    return err[0]


def test_usage_errors_before_the_run_directory(checkpoint, run, tmp_path, capsys):
    ckpt, text, _ = checkpoint
    out = tmp_path / "never"
    base = ["train", "--data", text, "--out-dir", str(out), "--steps", "1", *TRAIN]
    not_ckpt = tmp_path / "empty"
    not_ckpt.mkdir()
    small = tmp_path / "small_vocab"  # a checkpoint whose vocabulary is smaller than its tokenizer's
    m = transformers.xLSTMForCausalLM(transformers.xLSTMConfig(
        vocab_size=256, hidden_size=128, num_hidden_layers=1, num_heads=2, chunk_size=16))
    m.save_pretrained(str(small))
    _write_tokenizer(str(small))
    cases = [
        (["--init-from", str(tmp_path / "missing")], "is not a directory"),
        (["--init-from", str(not_ckpt)], "not a transformers checkpoint directory"),
        (["--init-from", ckpt, "--preset", "tiny"], "--preset tiny and --init-from both define the model"),
        (["--init-from", ckpt, "--num-heads", "4"], "--num-heads 4 (the checkpoint has 2)"),
        (["--init-from", str(small)], "320 tokens, more than the model's vocabulary of 256"),
        (["--preset", "tiny", "--tokenizer", ckpt], "320 tokens, more than the model's vocabulary of 256"),
        (["--init-from", ckpt, "--tokenizer", str(tmp_path / "none.json")], "--tokenizer"),
    ]
    for extra, match in cases:
        assert match in _usage_error(capsys, base + extra), extra
        assert not out.exists(), extra
    # a checkpoint whose weights do not match its config.json
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3, "num_blocks": 3}))
    assert "missing tensors" in _usage_error(capsys, base + ["--init-from", str(broken)])
    assert not out.exists()
    # resuming a run with another tokenizer or another initial checkpoint
    again = ["train", "--data", text, "--out-dir", run, "--steps", "3", *TRAIN]
    assert "['tokenizer']" in _usage_error(capsys, again + ["--init-from", ckpt, "--tokenizer", "bytes"])
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    assert "['init_from', 'tokenizer']" in _usage_error(capsys, again + ["--init-from", str(other)])
    assert "['init_from']" in _usage_error(capsys, again + ["--init-from", str(other), "--tokenizer", ckpt])
    assert max(_losses(run)) == 2  # nothing ran
