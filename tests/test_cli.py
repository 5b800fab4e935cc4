"""The command line: every user error is one ``xlstm-jax: error:`` line on stderr and exit status 2,
before any run directory is created; ``--help`` shows defaults and imports no JAX."""

import argparse
import os
import subprocess
import sys

import pytest

from xlstm_jax import cli
from xlstm_jax.tools.options import HelpFormatter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_error_line(capsys, rc, *expected):
    """rc is 2, stderr is exactly one error line holding every ``expected`` text, no traceback."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, (rc, captured.err, captured.out[-2000:])
    assert len(lines) == 1 and lines[0].startswith("xlstm-jax: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


TRAIN_ERRORS = [
    # id, extra arguments, texts the message must hold
    ("backend-unknown", ["--backend", "nope"], ["--backend", "'nope'", "fwbw_stabilized", "triton_kernels"]),
    ("backend-forward-only", ["--backend", "recurrent_triton"], ["forward-only", "backends that train", "fwbw_stabilized"]),
    ("step-kernel-unknown", ["--step-kernel", "nope"], ["--step-kernel", "'nope'", "recurrent_native", "recurrent_pallas"]),
    ("steps-0", ["--steps", "0"], ["--steps", ">= 1", "got 0"]),
    ("steps-text", ["--steps", "ten"], ["--steps", "'ten'"]),
    ("lr-negative", ["--lr", "-1"], ["--lr", "> 0", "-1"]),
    ("lr-nan", ["--lr", "nan"], ["--lr", "nan"]),
    ("batch-0", ["--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("embedding-0", ["--embedding-dim", "0"], ["--embedding-dim", ">= 1"]),
    ("blocks-negative", ["--num-blocks", "-1"], ["--num-blocks", ">= 1"]),
    ("heads-0", ["--num-heads", "0"], ["--num-heads", ">= 1"]),
    ("heads-not-dividing", ["--num-heads", "3"], ["num_heads 3"]),
    ("context-0", ["--context-length", "0"], ["--context-length", ">= 1"]),
    ("warmup-negative", ["--warmup-steps", "-1"], ["--warmup-steps", ">= 0"]),
    ("weight-decay-negative", ["--weight-decay", "-0.1"], ["--weight-decay", ">= 0"]),
    ("heldout-0", ["--heldout-fraction", "0"], ["--heldout-fraction", "(0, 1)"]),
    ("log-every-0", ["--log-every", "0"], ["--log-every", ">= 1"]),
    ("seq-len-beyond-context", ["--seq-len", "33"], ["--seq-len", "33", "context length 32"]),
    ("mesh-two", ["--mesh", "2,2"], ["--mesh", "'2,2'"]),
    ("mesh-text", ["--mesh", "a,b,c"], ["--mesh", "'a,b,c'"]),
    ("mesh-zero", ["--mesh", "0,1,1"], ["--mesh", "'0,1,1'"]),
    ("mesh-too-many-devices", ["--mesh", "16,2,1"], ["--mesh", "needs 32 devices", "has"]),
    ("mesh-heads", ["--mesh", "1,1,4"], ["--mesh", "num_heads 2", "tensor axis 4"]),
    ("mesh-batch", ["--mesh", "3,1,1"], ["--mesh", "batch size 4", "data x fsdp = 3"]),
    ("backend-option-unknown", ["--backend-option", "chunksize=16"], ["--backend-option", "chunksize", "chunk_size"]),
    ("backend-option-no-value", ["--backend-option", "chunk_size"], ["--backend-option", "NAME=VALUE"]),
    ("backend-option-bad-value", ["--backend-option", "chunk_size=0"], ["--backend-option", "chunk_size"]),
    ("unknown-option", ["--fast"], ["unrecognized arguments: --fast", "xlstm-jax train --help"]),
    ("dtype", ["--dtype", "int8"], ["--dtype", "'int8'"]),
]


@pytest.mark.parametrize("extra, expected", [c[1:] for c in TRAIN_ERRORS], ids=[c[0] for c in TRAIN_ERRORS])
def test_train_user_errors(tmp_path, capsys, extra, expected):
    run_dir = tmp_path / "run"
    rc = cli.main(["train", "--preset", "tiny", "--batch-size", "4", "--out-dir", str(run_dir), *extra])
    _one_error_line(capsys, rc, *expected)
    assert not run_dir.exists()


def test_train_data_errors(tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--out-dir", str(run_dir), "--data"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "short.txt").write_text("far too short\n")
    cases = [
        ([str(tmp_path / "missing.txt")], ["missing.txt", "does not exist"]),
        ([str(tmp_path / "latin1.txt")], ["latin1.txt", "not UTF-8", "byte offset 3"]),
        ([str(tmp_path)], ["not a regular file"]),
        ([str(tmp_path / "short.txt")], ["too short for one batch", "--batch-size"]),
    ]
    for files, expected in cases:
        _one_error_line(capsys, cli.main(base + files), *expected)
        assert not run_dir.exists()


def test_train_refuses_another_run_before_touching_it(tmp_path, capsys):
    from xlstm_jax.models.xlstm_lm import preset_config
    from xlstm_jax.train.run import prepare_run_dir
    from xlstm_jax.train.trainer import TrainConfig

    run_dir = tmp_path / "run"
    prepare_run_dir(preset_config("tiny"), TrainConfig(out_dir=str(run_dir), batch_size=4))
    before = sorted(os.listdir(run_dir)), (run_dir / "config.json").read_text()
    base = ["train", "--preset", "tiny", "--out-dir", str(run_dir)]
    _one_error_line(capsys, cli.main(base + ["--batch-size", "8"]), "different settings ['batch_size']", "--overwrite")
    _one_error_line(capsys, cli.main(base + ["--batch-size", "4", "--num-blocks", "3"]), "different config", "num_blocks")
    (run_dir / "notes.txt").write_text("mine")
    _one_error_line(capsys, cli.main(base + ["--overwrite"]), "--overwrite deletes run directories only", "notes.txt")
    assert sorted(os.listdir(run_dir)) == sorted(before[0] + ["notes.txt"])
    assert (run_dir / "config.json").read_text() == before[1]
    _one_error_line(capsys, cli.main(["train", "--out-dir", str(run_dir / "config.json")]), "not a directory")


@pytest.mark.parametrize("argv, expected", [
    (["check", "--reps", "0"], ["--reps", ">= 1"]),
    (["check", "--steps", "0"], ["--steps", ">= 1"]),
    (["check", "--shape", "1,2,3"], ["--shape", "B,NH,S,DHQK,DHV", "'1,2,3'"]),
    (["check", "--shape", "1,2,0,4,4"], ["--shape"]),
    (["check", "--kernels", "nope"], ["--kernels", "'nope'", "chunkwise_native"]),
    (["check", "--step-kernels", "nope"], ["--step-kernels", "'nope'", "recurrent_pallas"]),
    (["check", "--dtype", "int32"], ["--dtype"]),
    (["bench", "--shapes", "64"], ["--shapes", "'64'"]),
    (["bench", "--shapes", "a,b"], ["--shapes"]),
    (["bench", "--shapes", "0,64"], ["--shapes"]),
    (["bench", "--heads", "huge"], ["--heads", "standard, 7b, small", "NH,DHQK,DHV"]),
    (["bench", "--heads", "16,128"], ["--heads", "'16,128'"]),
    (["bench", "--kernels", "nope"], ["--kernels", "'nope'", "chunkwise_native"]),
    (["bench", "--kernels", "chunkwise_native:chunksize=16"], ["--kernels", "takes no option", "chunksize"]),
    (["bench", "--kernels", "chunkwise_native:16"], ["--kernels", "not key=value"]),
    (["bench", "--reps", "0"], ["--reps", ">= 1"]),
    (["bench", "--modes", "bw"], ["--modes"]),
    (["bench-decode", "--batches", "0,8"], ["--batches", "'0,8'"]),
    (["bench-decode", "--heads", "x"], ["--heads"]),
    (["nope"], ["invalid choice", "bench-decode"]),
])
def test_tool_user_errors(capsys, argv, expected):
    _one_error_line(capsys, cli.main(argv), *expected)


def _options(parser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_help_shows_defaults():
    """Every option of every command says its default in --help (flags are off by default)."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subparsers.choices) == sorted(cli.COMMANDS)
    for name, sub in subparsers.choices.items():
        text = sub.format_help()  # expands every %(default)s
        assert name in text
        formatter = HelpFormatter(name)
        for action in _options(sub):
            if isinstance(action, argparse._StoreTrueAction):
                continue
            assert "default" in formatter._get_help_string(action), (name, action.option_strings)
    train = " ".join(subparsers.choices["train"].format_help().split())
    for text in ("(default: demo)", "(default: 600)", "(default: runs/default)", "(default: 0.003)"):
        assert text in train


def test_preset_names_match_the_presets():
    from xlstm_jax.models.xlstm_lm.config import PRESETS
    from xlstm_jax.tools.train_cmd import PRESET_NAMES

    assert tuple(sorted(PRESETS)) == PRESET_NAMES


def test_help_imports_no_jax():
    """`xlstm-jax --help` and `xlstm-jax train --help` build the parser without importing JAX."""
    code = (
        "import sys\n"
        "from xlstm_jax import cli\n"
        "for argv in (['--help'], ['train', '--help'], ['bench', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print('jax imported:', 'jax' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("jax imported: False"), out.stdout[-500:]


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
