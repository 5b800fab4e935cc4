"""Shared Pallas plumbing. Triton-specific imports live only in ``_triton.py`` (DESIGN.md section 3),
so that a Mosaic GPU path can be added beside it."""
