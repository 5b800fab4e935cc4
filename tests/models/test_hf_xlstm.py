"""Checkpoints in the transformers xLSTMForCausalLM format, against transformers itself (PyTorch, CPU).

Small random transformers models with EVERY parameter re-drawn at random (their default init leaves
gate weights at 0 and norm weights at 1, which would hide a wrong mapping), saved with transformers'
``save_pretrained``: our logits equal transformers' (float32, full-precision products), a greedy
continuation through prefill and decode is identical token for token, our ``save_pretrained`` loads
back in transformers with identical weights and the same logits (both weight modes), and what
cannot be honoured is refused.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the `test` extra installs torch (CPU build) and transformers
transformers = pytest.importorskip("transformers")

from xlstm_jax.models.xlstm_lm import (  # noqa: E402
    Generator,
    config_to_hf,
    load_pretrained,
    preset_config,
    read_pretrained_config,
    save_pretrained,
    unstack_block_params,
)
from xlstm_jax.models.xlstm_lm.sharding import make_mesh  # noqa: E402
from xlstm_jax.testing import relative_error  # noqa: E402

TOL = 1e-5
CONFIGS = {
    # the released model's settings, shrunk
    "default": dict(vocab_size=101, hidden_size=128, num_hidden_layers=2, num_heads=2, chunk_size=16),
    # every computation-changing field away from its default
    "variant": dict(
        vocab_size=89, hidden_size=128, num_hidden_layers=3, num_heads=4, chunk_size=16, use_bias=True,
        qk_dim_factor=0.5, v_dim_factor=1.5, ffn_proj_factor=1.3, ffn_round_up_to_multiple_of=32,
        gate_soft_cap=4.0, output_logit_soft_cap=6.0, norm_eps=1e-4, eps=1e-3, tie_word_embeddings=True,
        bos_token_id=3, eos_token_id=5, pad_token_id=4,
    ),
}


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _randomize(model, seed: int) -> None:
    """Re-draw every parameter: norm weights around 1, gate biases around typical values, the rest
    normal with std 1/sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("norm.weight") or "norm_" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif "igate_preact.bias" in name:
                p.copy_(-2.0 + noise)
            elif "fgate_preact.bias" in name:
                p.copy_(3.0 + noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            elif "embeddings" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)


def _hf_model(kind: str, seed: int = 0):
    cfg = transformers.xLSTMConfig(**CONFIGS[kind])
    model = transformers.xLSTMForCausalLM(cfg).eval()
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(kind, directory, transformers model) of a random checkpoint saved by transformers."""
    model = _hf_model(request.param, seed=len(request.param))
    path = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
    model.save_pretrained(path)
    return request.param, path, model


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def _ids(seed: int, shape, vocab: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def test_logits_equal_transformers(checkpoint):
    kind, path, hf = checkpoint
    model, params = load_pretrained(path)
    cfg = model.config
    assert cfg.vocab_size == hf.config.vocab_size and cfg.num_blocks == hf.config.num_hidden_layers
    assert cfg.eos_token_id == hf.config.eos_token_id and cfg.multihead_norm == "layernorm"
    ids = _ids(1, (2, 37), cfg.vocab_size)  # 37: two chunks of 16 and a remainder in transformers
    ref = _hf_logits(hf, ids)
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    assert out.shape == ref.shape
    err = relative_error(out, ref)
    assert err < TOL, err
    for b in range(2):
        assert relative_error(out[b], ref[b]) < TOL


def test_greedy_continuation_equals_transformers(checkpoint):
    kind, path, hf = checkpoint
    model, params = load_pretrained(path)
    prompt = _ids(2, (1, 21), model.config.vocab_size)
    new = 12
    with torch.no_grad():
        ref = hf.generate(
            torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=new, min_new_tokens=new, do_sample=False,
            pad_token_id=hf.config.pad_token_id,
        )[0, prompt.shape[1]:].numpy()
    assert ref.shape == (new,)
    (ours,) = Generator(model, params, block_size=5).generate([prompt[0]], new, eos_token_id=None)
    np.testing.assert_array_equal(ours, ref)


def _redraw_single_to_fused(sd: dict, cfg) -> dict:
    """The same weights in transformers' fused layout."""
    out = {}
    for name, w in sd.items():
        if ".mlstm_layer.q." in name:
            stem, kind = name.split(".mlstm_layer.q.")
            base = stem + ".mlstm_layer."
            out[base + "qkv_opreact." + kind] = torch.cat(
                [sd[base + f"{m}.{kind}"] for m in ("q", "k", "v", "ogate_preact")], dim=0
            )
        elif ".mlstm_layer.igate_preact." in name:
            stem, kind = name.split(".mlstm_layer.igate_preact.")
            base = stem + ".mlstm_layer."
            out[base + "ifgate_preact." + kind] = torch.cat([sd[base + f"igate_preact.{kind}"], sd[base + f"fgate_preact.{kind}"]])
        elif ".ffn.proj_up_gate." in name:
            stem, kind = name.split(".ffn.proj_up_gate.")
            out[stem + ".ffn.proj_up_gate_z." + kind] = torch.cat([w, sd[stem + f".ffn.proj_up.{kind}"]])
        elif any(f".mlstm_layer.{m}." in name for m in ("k", "v", "ogate_preact", "fgate_preact")) or ".ffn.proj_up." in name:
            continue
        else:
            out[name] = w
    return out


def _fused_hf_model(hf_config: dict, state_dict: dict, monkeypatch):
    """A transformers xLSTM in weight_mode "fused" holding ``state_dict`` (transformers 5.x cannot
    run its own initialisation for fused models, so it is skipped; every weight is then loaded)."""
    monkeypatch.setattr(transformers.xLSTMPreTrainedModel, "_init_weights", lambda self, module: None)
    model = transformers.xLSTMForCausalLM(transformers.xLSTMConfig(**{**hf_config, "weight_mode": "fused"})).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=True)
    assert not missing and not unexpected
    return model


def test_save_then_transformers_load(checkpoint, tmp_path, monkeypatch):
    kind, path, hf = checkpoint
    model, params = load_pretrained(path)
    ids = _ids(3, (2, 29), model.config.vocab_size)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))

    out_dir = str(tmp_path / "single")
    save_pretrained(out_dir, model.config, params)
    back = transformers.xLSTMForCausalLM.from_pretrained(out_dir).eval()
    sd_ref, sd_back = hf.state_dict(), back.state_dict()
    assert sorted(sd_ref) == sorted(sd_back)
    for name in sd_ref:
        assert torch.equal(sd_ref[name], sd_back[name]), name
    assert relative_error(_hf_logits(back, ids), ours) < TOL

    # the fused layout: written by us, loaded by transformers and by us
    fused_dir = str(tmp_path / "fused")
    save_pretrained(fused_dir, model.config, params, weight_mode="fused", max_shard_bytes=40_000)
    assert os.path.isfile(os.path.join(fused_dir, "model.safetensors.index.json"))  # sharded
    with open(os.path.join(fused_dir, "config.json")) as fh:
        hf_config = json.load(fh)
    assert hf_config["weight_mode"] == "fused"
    from safetensors.torch import load_file

    with open(os.path.join(fused_dir, "model.safetensors.index.json")) as fh:
        files = sorted(set(json.load(fh)["weight_map"].values()))
    assert len(files) > 1
    fused_sd = {}
    for f in files:
        fused_sd.update(load_file(os.path.join(fused_dir, f)))
    expect = _redraw_single_to_fused(sd_ref, hf.config)
    assert sorted(fused_sd) == sorted(expect)
    for name in expect:
        assert torch.equal(fused_sd[name], expect[name]), name
    fused_hf = _fused_hf_model({k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")},
                               fused_sd, monkeypatch)
    assert relative_error(_hf_logits(fused_hf, ids), ours) < TOL
    model_f, params_f = load_pretrained(fused_dir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params_f), jax.device_get(params))


def test_dtype_layout_and_mesh_on_load(checkpoint):
    kind, path, hf = checkpoint
    model, params = load_pretrained(path)
    ids = jnp.asarray(_ids(4, (8, 19), model.config.vocab_size))
    ref = jax.jit(model.apply)({"params": params}, ids)
    # bfloat16: every parameter is the float32 one rounded
    m16, p16 = load_pretrained(path, dtype="bfloat16")
    assert m16.config.dtype == m16.config.param_dtype == "bfloat16"
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16))), p16, params
    )
    # unrolled layout: the same arrays per block, the same logits
    mu, pu = load_pretrained(path, unrolled=True)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(pu), jax.device_get(unstack_block_params(params)))
    assert relative_error(jax.jit(mu.apply)({"params": pu}, ids), ref) < 1e-6
    if len(jax.devices()) >= 8:
        mesh = make_mesh((2, 2, 2))
        mm, pm = load_pretrained(path, mesh=mesh)
        q = pm["blocks"]["mlstm"]["q"]["kernel"]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        assert len(q.addressable_shards) == 8
        assert relative_error(jax.jit(mm.apply)({"params": pm}, ids), ref) < 1e-6


def _write_variant(src: str, dst: str, *, config_changes=None, drop=(), add=None, reshape=None) -> str:
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as fh:
        cfg = json.load(fh)
    cfg.update(config_changes or {})
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    sd = load_file(os.path.join(src, "model.safetensors"))
    for name in drop:
        sd.pop(name)
    sd.update(add or {})
    for name, shape in (reshape or {}).items():
        sd[name] = torch.zeros(shape)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_refusals(checkpoint, tmp_path):
    kind, path, hf = checkpoint
    if kind != "default":
        pytest.skip("one checkpoint is enough")
    for changes, match in [
        ({"add_out_norm": False}, "add_out_norm"),
        ({"inference_state_dtype": "bfloat16"}, "inference_state_dtype"),
        ({"embedding_dim": 64}, "embedding_dim"),
        ({"weight_mode": "both"}, "weight_mode"),
        ({"model_type": "llama"}, "model_type"),
    ]:
        d = _write_variant(path, str(tmp_path / match), config_changes=changes)
        with pytest.raises(ValueError, match=match):
            load_pretrained(d)
    name = "backbone.blocks.1.mlstm_layer.k.weight"
    with pytest.raises(ValueError, match="missing tensors.*blocks.1.mlstm_layer.k.weight"):
        load_pretrained(_write_variant(path, str(tmp_path / "missing"), drop=[name]))
    with pytest.raises(ValueError, match="unexpected tensors.*extra"):
        load_pretrained(_write_variant(path, str(tmp_path / "extra"), add={"extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"has shape \(64, 64\)"):
        load_pretrained(_write_variant(path, str(tmp_path / "shape"), reshape={name: (64, 64)}))
    with pytest.raises(ValueError, match="not a transformers checkpoint"):
        load_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained(str(tmp_path / "nowhere"))
    # a config that does not compute the checkpoint's function
    cfg = read_pretrained_config(path)
    with pytest.raises(ValueError, match="norm_eps"):
        load_pretrained(path, config=cfg.replace(norm_eps=1e-3))
    with pytest.raises(ValueError, match="cell eps"):
        load_pretrained(path, config=cfg.replace(mlstm_backend_kwargs={"eps": 1e-3}))
    # configs of ours that transformers cannot compute
    with pytest.raises(ValueError, match="multihead_norm"):
        config_to_hf(cfg.replace(multihead_norm="rms"))
    with pytest.raises(ValueError, match="multiple of 64"):
        config_to_hf(preset_config("tiny"))
    with pytest.raises(ValueError, match="output_logit_soft_cap"):
        config_to_hf(cfg.replace(output_logit_soft_cap=None))
    with pytest.raises(ValueError, match="norm_val"):
        config_to_hf(cfg.replace(mlstm_backend_kwargs={"norm_val": 2.0}))
