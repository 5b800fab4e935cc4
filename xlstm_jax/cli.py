"""Command-line entry point: ``xlstm-jax <command> [options]`` (also ``python -m xlstm_jax``).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
the module is imported only when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("xlstm_jax.tools.check", "check every registered kernel against the float64 reference"),
    "bench": ("xlstm_jax.tools.bench", "time the kernels at the standard workload (PERF.md)"),
    "train": ("xlstm_jax.tools.train_cmd", "train the xLSTM language model (default: small model, embedded corpus)"),
    "generate": ("xlstm_jax.tools.generate_cmd", "generate text from a trained run's checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlstm-jax", description="xLSTM in JAX: kernels, models, tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
