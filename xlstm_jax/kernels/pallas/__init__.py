"""Shared Pallas plumbing. Triton-specific imports live only in ``_triton.py`` (docs/design.md),
so that a Mosaic GPU path can be added beside it."""
