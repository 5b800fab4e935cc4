"""The one error type of the command line: a user error, reported as one line, exit status 2.

Subcommands raise ``UsageError("what is wrong, naming the option and the value")`` for anything the
user can fix (a missing run directory, an unknown backend, a bad number), before any run directory is
created or any work starts. ``xlstm_jax.cli.main`` prints ``xlstm-jax: error: <message>`` to stderr
and returns 2; it never shows a traceback for a ``UsageError``.
"""

from __future__ import annotations


class UsageError(Exception):
    """A user error of the command line (bad option value, missing file, unknown name)."""
