"""Command implementations of the ``xlstm-jax`` CLI."""
