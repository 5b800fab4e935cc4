"""The subcommands of the ``xlstm-jax`` CLI (see ``xlstm_jax.cli.COMMANDS``) and their helpers.

Commands: ``train_cmd``, ``generate_cmd``, ``check``, ``bench``, ``bench_decode``; each has
``add_arguments(parser)`` and ``run(args) -> int`` and imports JAX only inside ``run``. Helpers:
``errors`` (``UsageError``), ``options`` (argument types, the help formatter), ``workload`` (the
benchmark workload), ``timing`` (the one benchmark timer and the device ceilings).
"""
