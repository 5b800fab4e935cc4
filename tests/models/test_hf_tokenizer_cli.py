"""Tokenizers (a tiny BPE tokenizer.json built here with the `tokenizers` library) and the commands
`generate --model DIR` and `bench-generate` on a random checkpoint written by save_pretrained."""

import argparse
import json
import os

import jax
import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")  # in the `test` extra (and the `hf` extra)

from xlstm_jax.models.xlstm_lm import init_params, load_pretrained, preset_config, save_pretrained  # noqa: E402
from xlstm_jax.text import HFTokenizer, StreamDecoder, load_tokenizer  # noqa: E402
from xlstm_jax.tools import bench_generate, generate_cmd  # noqa: E402
from xlstm_jax.tools.errors import UsageError  # noqa: E402
from xlstm_jax.train.tokenizer import ByteTokenizer  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 8,
    "xLSTM in JAX: prefill, decode, serve. Grüße aus Linz! 日本語も少し。",
    "def f(x):\n    return x * 2\n",
]


def _write_tokenizer(directory: str, *, template_bos: bool = False, tokenizer_config: dict | None = None) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    if template_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if tokenizer_config is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
            json.dump(tokenizer_config, fh)
    return directory


def test_tokenizer_round_trip_and_bos(tmp_path):
    d = _write_tokenizer(str(tmp_path / "plain"), tokenizer_config={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    tok = HFTokenizer(d)
    assert tok.bos_token_id == 0 and tok.eos_token_id == 0 and tok.add_bos
    assert tok.vocab_size == 320
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids[0] == 0 and (ids[1:] != 0).all()
        assert len(ids) < len(text.encode()) + 1  # merges happened
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False) == "<|endoftext|>" + text
    # the post-processor already adds BOS: not doubled
    d2 = _write_tokenizer(str(tmp_path / "template"), template_bos=True,
                          tokenizer_config={"bos_token": "<|endoftext|>", "add_bos_token": True})
    t2 = HFTokenizer(d2)
    np.testing.assert_array_equal(t2.encode(TEXTS[1]), tok.encode(TEXTS[1]))
    # add_bos from tokenizer_config.json, or given; the BOS id from config.json
    d3 = _write_tokenizer(str(tmp_path / "nobos"), tokenizer_config={"add_bos_token": False})
    assert HFTokenizer(d3).encode("fox")[0] != 0 and not HFTokenizer(d3).add_bos
    with open(os.path.join(d3, "config.json"), "w") as fh:
        json.dump({"bos_token_id": 1}, fh)
    t3 = HFTokenizer(d3, add_bos=True)
    assert t3.bos_token_id == 1 and t3.encode("fox")[0] == 1
    assert t3.decode(t3.encode("fox")) == "fox"
    with pytest.raises(ValueError, match="encode takes a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="does not exist"):
        HFTokenizer(str(tmp_path / "none.json"))
    # the factory
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(load_tokenizer(None, model_dir=str(tmp_path)), ByteTokenizer)
    assert isinstance(load_tokenizer(None, model_dir=d), HFTokenizer)
    assert isinstance(load_tokenizer(os.path.join(d, "tokenizer.json")), HFTokenizer)
    with pytest.raises(ValueError, match="neither 'bytes'"):
        load_tokenizer(str(tmp_path / "missing"))


def test_stream_decoder_holds_back_partial_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("aé日b")  # 1 + 2 + 3 + 1 bytes
    dec = StreamDecoder(tok)
    pieces = [dec.feed(ids[i:i + 1]) for i in range(len(ids))]
    assert "".join(pieces) + dec.flush() == "aé日b"
    assert "\ufffd" not in "".join(pieces)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    """A random model of ours (vocabulary of the tiny tokenizer) saved with its tokenizer.json."""
    d = str(tmp_path_factory.mktemp("rand"))
    _write_tokenizer(d, tokenizer_config={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    cfg = preset_config(
        "demo", vocab_size=320, num_blocks=2, mlstm_backend_kwargs={"chunk_size": 16}, bos_token_id=0, eos_token_id=0,
        pad_token_id=1,
    )
    save_pretrained(d, cfg, init_params(cfg, jax.random.key(0)))
    return d


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_generate_model_dir(random_checkpoint, capsys):
    args = _parse(generate_cmd, ["--model", random_checkpoint, "--prompt", "The quick", "--max-new-tokens", "6",
                                 "--greedy", "--no-eos"])
    assert generate_cmd.run(args) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith(f"# {random_checkpoint}: prefill") and "tokenizer tokenizer.json" in lines[0]
    assert lines[-1].startswith("The quick") and len(lines[-1]) > len("The quick")
    assert "6 tokens in" in out.err
    # the streamed text is the decoded greedy continuation
    model, params = load_pretrained(random_checkpoint)
    from xlstm_jax.models.xlstm_lm import Generator

    tok = HFTokenizer(random_checkpoint)
    (toks,) = Generator(model, params).generate([tok.encode("The quick")], 6, eos_token_id=None)
    assert lines[-1] == "The quick" + tok.decode(toks)
    # a batch of two prompts, sampled
    args = _parse(generate_cmd, ["--model", random_checkpoint, "--prompt", "fox", "--prompt", "def f(x):",
                                 "--max-new-tokens", "4", "--temperature", "0.7", "--top-k", "5"])
    assert generate_cmd.run(args) == 0
    text = capsys.readouterr().out
    assert "2 row(s)" in text and "\nfox" in text and "\ndef f(x):" in text


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "/nonexistent/dir"], "is not a directory"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--temperature", "-1"], "--temperature"),
        (["--backend", "nope"], "--backend 'nope' is unknown"),
        (["--step-kernel", "nope"], "--step-kernel 'nope' is unknown"),
        (["--tokenizer", "/nonexistent/tok.json"], "--tokenizer"),
        (["--prompt", "", "--no-bos"], "--prompt must not be empty"),  # with BOS, "" is a valid prompt
        (["--step", "3"], "--step applies to --run-dir only"),
    ],
)
def test_generate_usage_errors(random_checkpoint, argv, match):
    if "--model" not in argv:
        argv = ["--model", random_checkpoint] + argv
    with pytest.raises(UsageError, match=match):
        generate_cmd.run(_parse(generate_cmd, argv + ["--max-new-tokens", "2"] if "--max-new-tokens" not in argv else argv))


def test_generate_refuses_tokenizer_larger_than_vocab(tmp_path):
    d = str(tmp_path / "small")
    _write_tokenizer(d)
    cfg = preset_config("demo", vocab_size=256, num_blocks=1, mlstm_backend_kwargs={"chunk_size": 16})
    save_pretrained(d, cfg, init_params(cfg, jax.random.key(1)))
    with pytest.raises(UsageError, match="320 tokens; the model's vocabulary is 256"):
        generate_cmd.run(_parse(generate_cmd, ["--model", d, "--max-new-tokens", "2"]))
    with pytest.raises(UsageError, match="is not a run directory"):
        generate_cmd.run(_parse(generate_cmd, ["--run-dir", str(tmp_path), "--max-new-tokens", "2"]))


def test_bench_generate_tiny_on_cpu(tmp_path, capsys):
    out = str(tmp_path / "bench.json")
    argv = ["--preset", "tiny", "--dtype", "float32", "--prefill-lengths", "16,32", "--tokens-per-measurement", "64",
            "--ttft-lengths", "16", "--decode-batches", "1,2", "--decode-tokens", "6", "--block-size", "3",
            "--reps", "1", "--copy-mib", "4", "--matmul-n", "64", "--json", out]
    assert bench_generate.run(_parse(bench_generate, argv)) == 0
    text = capsys.readouterr().out
    assert "| prefill | S=16 B=4 |" in text and "| ttft | S=16 |" in text and "| decode | B=2 scan |" in text
    with open(out) as fh:
        res = json.load(fh)
    assert [r["S"] for r in res["prefill"]] == [16, 32] and res["ceilings"]["copy_bytes_per_s"] > 0
    assert {(r["layout"], r["B"]) for r in res["decode"]} == {(lay, b) for lay in ("unrolled", "scan") for b in (1, 2)}
    for r in res["decode"]:
        assert r["steps"] == 6 and r["tokens_per_s"] > 0 and r["floor_tokens_per_s_per_row"] > 0
    assert res["complete"] and len(res["rows"]) == 2 + 1 + 4
    # the table again from the JSON (as scripts/gpu_infer.sh prints it after a time limit)
    capsys.readouterr()
    assert bench_generate.run(_parse(bench_generate, ["--table-from", out])) == 0
    again = capsys.readouterr().out
    assert again.strip().splitlines()[-len(res["rows"]) - 2:] == text.strip().splitlines()[-len(res["rows"]) - 2:]
    # a part alone builds only the layout it uses
    out2 = str(tmp_path / "ttft.json")
    assert bench_generate.run(_parse(bench_generate, argv[:-1] + [out2, "--parts", "ttft"])) == 0
    with open(out2) as fh:
        res2 = json.load(fh)
    assert "prefill" not in res2 and "decode" not in res2 and [r["S"] for r in res2["ttft"]] == [16]
    with pytest.raises(UsageError, match="not a multiple"):
        bench_generate.run(_parse(bench_generate, ["--preset", "tiny", "--prefill-lengths", "48",
                                                   "--tokens-per-measurement", "64"]))
    with pytest.raises(UsageError, match="--parts"):
        bench_generate.run(_parse(bench_generate, ["--parts", "nothing"]))
