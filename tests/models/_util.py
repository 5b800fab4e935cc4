"""Helpers shared by the model tests."""

import jax


def assert_tree_below(errs, tol):
    """Every leaf of a tree of errors is below ``tol`` (a NaN leaf fails: NaN < tol is False)."""
    leaves = jax.tree_util.tree_leaves_with_path(errs)
    assert leaves, "no errors to check"
    bad = {jax.tree_util.keystr(path): err for path, err in leaves if not err < tol}
    assert not bad, f"errors not below {tol}: {bad}"
