"""load_pretrained on every Hugging Face directory layout, on our converted format, and on a mesh."""

import checkpoint_fixtures as fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_logits, make_config, make_hf_model
from jax.sharding import PartitionSpec

from optiml_jax import load_pretrained
from optiml_jax.checkpoints.convert import convert
from optiml_jax.sharding import MeshConfig, make_mesh
from optiml_jax.tokenizer import DEMO_TOKENIZER_DIR

ATOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    config = make_config("pre_ln", hidden_size=64, num_attention_heads=4, ffn_dim=128)
    hf_model = make_hf_model(config, seed=11)
    ids = np.random.default_rng(0).integers(4, config.vocab_size, size=(2, 8))
    return config, hf_model, ids, hf_logits(hf_model, ids)


def _logits(loaded, ids):
    return np.asarray(loaded.model.apply({"params": loaded.params}, jnp.asarray(ids)))


@pytest.mark.parametrize("layout", fixtures.HF_LAYOUTS)
def test_hf_directory_layouts(reference, layout, tmp_path):
    config, hf_model, ids, expected = reference
    directory = fixtures.write_hf_dir(tmp_path / layout, hf_model, config, layout)
    loaded = load_pretrained(directory, scan_layers=(layout != "bin"))
    assert loaded.config == config and loaded.tokenizer is None
    np.testing.assert_allclose(_logits(loaded, ids), expected, atol=ATOL, rtol=0)


def test_converted_directory_both_layouts_and_on_a_mesh(reference, tmp_path):
    config, hf_model, ids, expected = reference
    source = fixtures.write_hf_dir(tmp_path / "hf", hf_model, config, "sharded_bin")
    convert(source, tmp_path / "ours", tokenizer=DEMO_TOKENIZER_DIR, progress=False)
    for scan_layers in (True, False):
        loaded = load_pretrained(tmp_path / "ours", scan_layers=scan_layers)
        assert loaded.tokenizer is not None and loaded.tokenizer.eos_id == 2
        np.testing.assert_allclose(_logits(loaded, ids), expected, atol=ATOL, rtol=0)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    loaded = load_pretrained(tmp_path / "ours", mesh=mesh)
    q = loaded.params["decoder"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, heads, kv]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (config.num_hidden_layers, 32, 2, 16)
    import flax.linen as nn

    from optiml_jax.sharding import DEFAULT_RULES

    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        logits = jax.jit(lambda p, x: loaded.model.apply({"params": p}, x))(loaded.params, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=ATOL, rtol=0)


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="facebook/opt-125m.*offline.*local directory"):
        load_pretrained("facebook/opt-125m")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_pretrained("./does/not/exist")
