"""Every registered backend accepts the seed call signature and gives the same numbers."""

import jax
import pytest

from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import available_mlstm_backends, create_mlstm_backend
from xlstm_jax.testing import mlstm_inputs, relative_error

CPU_BACKENDS = ["fwbw_stabilized", "parallel_stabilized", "recurrent"]


def test_foundation_backends_are_registered():
    assert set(CPU_BACKENDS) <= set(available_mlstm_backends())


@pytest.mark.parametrize("gates", ["BNS", "BNS1"])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_backend_matches_chunkwise(name, gates):
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(jax.random.PRNGKey(0), 2, 2, 21, 8, 16, initial_states=True,
                                             m_initial_scale=3.0)
    if gates == "BNS1":
        i, f = i[..., None], f[..., None]
    ref = create_mlstm_backend("fwbw_stabilized", chunk_size=8)
    h_ref, st_ref = ref.apply({}, q, k, v, i, f, c0, n0, m0, return_last_states=True)
    backend = create_mlstm_backend(name)
    h, st = backend.apply({}, q, k, v, i, f, c0, n0, m0, return_last_states=True)
    assert relative_error(h, h_ref) < 1e-5
    for a, b in zip(st, st_ref):
        assert relative_error(a, b) < 1e-5
    h_only = backend.apply({}, q, k, v, i, f)
    assert h_only.shape == h.shape
