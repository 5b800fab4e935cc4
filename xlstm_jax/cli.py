"""Command-line entry point: ``xlstm-jax <command> [options]`` (also ``python -m xlstm_jax``).

The commands are the modules of ``xlstm_jax.tools`` listed in ``COMMANDS`` below; each has
``add_arguments(parser)`` (its options) and ``run(args) -> int`` (the exit status). Following a call:
``main`` parses the command line with the parser of ``build_parser``, then calls
``COMMANDS[name].module.run(args)``. The command modules import nothing heavy at module level or in
``add_arguments`` (JAX is imported inside ``run``), so ``xlstm-jax --help`` stays fast.

User errors: a command raises ``xlstm_jax.tools.errors.UsageError(message)`` (and argparse's own
errors are turned into one too); ``main`` prints the one line ``xlstm-jax: error: <message>`` to
stderr and returns 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import NamedTuple

from xlstm_jax.tools import bench, bench_decode, bench_generate, bench_train, check, generate_cmd, train_cmd, tune
from xlstm_jax.tools.errors import UsageError
from xlstm_jax.tools.options import HelpFormatter


class Command(NamedTuple):
    """A subcommand: the module that implements it and its one-line help."""

    module: ModuleType
    help: str


COMMANDS: dict[str, Command] = {
    "train": Command(train_cmd, "train the xLSTM language model (default: small model, embedded corpus)"),
    "generate": Command(generate_cmd, "generate text from a run (--run-dir) or a transformers checkpoint (--model)"),
    "check": Command(check, "check every registered sequence and step kernel against a float64 reference"),
    "bench": Command(bench, "time the sequence kernels at the benchmark workload (docs/benchmarks.md)"),
    "tune": Command(tune, "measure the Pallas chunkwise kernels' tile parameters on the GPU; writes the tuning cache"),
    "bench-decode": Command(bench_decode, "time one mLSTM decode step: the Pallas step against the pure-JAX step"),
    "bench-generate": Command(
        bench_generate, "time the xLSTM-7B model: prefill, time to first token, decode (random weights)"
    ),
    "bench-train": Command(bench_train, "time the training step of a preset: tokens/s, MFU, memory, profile by op family"),
}


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are ``UsageError``s (one line, exit status 2 in ``main``)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``xlstm-jax`` with one subparser per entry of ``COMMANDS``."""
    parser = _Parser(prog="xlstm-jax", description="xLSTM in JAX: kernels, models, tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, formatter_class=HelpFormatter)
        command.module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (2 for a user error, after one ``xlstm-jax: error:``
    line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            where = f"xlstm-jax {args.command}" if args.command else "xlstm-jax"
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see `{where} --help`)")
        if not args.command:
            parser.print_help(sys.stderr)
            return 2
        return int(COMMANDS[args.command].module.run(args) or 0)
    except UsageError as err:
        message = " ".join(str(err).split())  # one line
        print(f"xlstm-jax: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
