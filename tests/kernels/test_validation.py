"""Bad inputs raise ValueError naming the shapes, for every kernel and backend."""

import jax.numpy as jnp
import pytest

from xlstm_jax.kernels import available_mlstm_kernels, get_mlstm_kernel, get_mlstm_kernel_spec
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import (
    available_mlstm_backends,
    create_mlstm_backend,
    create_mlstm_backend_config,
)

B, NH, S, DHQK, DHV = 1, 2, 8, 16, 16


def _inputs(**over):
    x = dict(q=jnp.ones((B, NH, S, DHQK)), k=jnp.ones((B, NH, S, DHQK)), v=jnp.ones((B, NH, S, DHV)),
             i=jnp.ones((B, NH, S)), f=jnp.ones((B, NH, S)))
    x.update(over)
    return x


BAD = {
    "k-mismatch": (_inputs(k=jnp.ones((B, NH, S + 1, DHQK))), None, r"\(1, 2, 9, 16\)"),
    "v-batch": (_inputs(v=jnp.ones((B + 1, NH, S, DHV))), None, r"\(2, 2, 8, 16\)"),
    "q-rank3": (_inputs(q=jnp.ones((NH, S, DHQK))), None, r"\(2, 8, 16\)"),
    "gate-shape": (_inputs(i=jnp.ones((B, NH, S, 2))), None, r"\(1, 2, 8, 2\)"),
    "m0-shape": (_inputs(), (jnp.ones((B, NH, DHQK, DHV)), jnp.ones((B, NH, DHQK)), jnp.ones((B, NH, 1))),
                 r"m_initial has shape \(1, 2, 1\)"),
    "c0-shape": (_inputs(), (jnp.ones((B, NH, DHV, DHQK + 1)), jnp.ones((B, NH, DHQK)), jnp.ones((B, NH))),
                 r"c_initial has shape \(1, 2, 16, 17\)"),
    "partial-states": (_inputs(), (jnp.ones((B, NH, DHQK, DHV)), None, None), r"all three initial states"),
}


@pytest.mark.parametrize("name", sorted(set(available_mlstm_kernels()) - {"recurrent_native"}) + ["recurrent_native"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_kernels_reject_bad_inputs(name, case):
    x, states, pattern = BAD[case]
    kernel = get_mlstm_kernel(name)
    with pytest.raises(ValueError, match=pattern):
        kernel(x["q"], x["k"], x["v"], x["i"], x["f"], *(states or (None, None, None)))


@pytest.mark.parametrize("name", available_mlstm_kernels())
def test_kernels_reject_bad_options(name):
    x = _inputs()
    kernel = get_mlstm_kernel(name)
    with pytest.raises(ValueError, match="grad_mode"):
        kernel(x["q"], x["k"], x["v"], x["i"], x["f"], grad_mode="approximate")
    with pytest.raises(TypeError):
        kernel(x["q"], x["k"], x["v"], x["i"], x["f"], not_an_option=1)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True])
def test_chunk_size_must_be_positive_int(chunk_size):
    x = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        get_mlstm_kernel("chunkwise_native", chunk_size=chunk_size)(x["q"], x["k"], x["v"], x["i"], x["f"])
    with pytest.raises(ValueError, match="chunk_size"):
        create_mlstm_backend_config("fwbw_stabilized", chunk_size=chunk_size)


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="available: .*chunkwise_native"):
        get_mlstm_kernel("chunkwise_typo")
    with pytest.raises(ValueError, match="its options are \\['chunk_size'\\]"):
        get_mlstm_kernel("chunkwise_native", chunksize=16)
    assert get_mlstm_kernel_spec("chunkwise_native").options == {"chunk_size": 64}
    with pytest.raises(ValueError, match="available: .*fwbw_stabilized"):
        create_mlstm_backend("no_such_backend")
    with pytest.raises(ValueError, match="its fields are"):
        create_mlstm_backend("recurrent", chunk_size=64)


@pytest.mark.parametrize("name", available_mlstm_backends())
def test_backends_reject_bad_shapes(name):
    backend = create_mlstm_backend(name)
    x = _inputs(v=jnp.ones((B, NH, S - 1, DHV)))
    with pytest.raises(ValueError, match=r"\(1, 2, 7, 16\)"):
        backend.apply({}, x["q"], x["k"], x["v"], x["i"], x["f"])


def test_parallel_backend_refuses_sequences_beyond_its_context():
    backend = create_mlstm_backend("parallel_stabilized", context_length=4)
    x = _inputs()
    with pytest.raises(ValueError, match="exceeds context_length 4"):
        backend.apply({}, x["q"], x["k"], x["v"], x["i"], x["f"])
