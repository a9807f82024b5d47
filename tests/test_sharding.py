"""Params are created in their shards, and the sharded model computes what the single-device one does."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_logits, hf_state_dict, make_config, make_hf_model

from optiml_jax.checkpoints.mapping import hf_to_params
from optiml_jax.model import OPTForCausalLM
from optiml_jax.sharding import DEFAULT_RULES, MeshConfig, init_params_sharded, make_mesh


def test_mesh_config_resolves_minus_one_and_rejects_bad_sizes():
    assert MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == (2, 2, 2)
    assert MeshConfig(data=1, fsdp=-1, tensor=1).resolve(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="cannot be split"):
        MeshConfig(data=-1, fsdp=3).resolve(8)
    with pytest.raises(ValueError, match="only one"):
        MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="but 8 are available"):
        MeshConfig(data=2, fsdp=1, tensor=1).resolve(8)


def test_params_are_created_sharded_per_the_rules():
    config = make_config("pre_ln", hidden_size=64, num_attention_heads=4, ffn_dim=128)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params, shardings = init_params_sharded(
        OPTForCausalLM(config, scan_layers=True), jax.random.PRNGKey(0), mesh
    )
    fc1 = params["decoder"]["layers"]["fc1"]["kernel"]  # [layers, embed, mlp]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    q = params["decoder"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, heads, kv]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    # Each device holds a quarter of the weight (fsdp=2 x tensor=2), not all of it.
    shard = fc1.addressable_shards[0].data
    assert shard.shape == (config.num_hidden_layers, 32, 64)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_forward_matches_hf(mesh_shape):
    config = make_config("pre_ln", hidden_size=64, num_attention_heads=4, ffn_dim=128)
    hf_model = make_hf_model(config)
    params = hf_to_params(hf_state_dict(hf_model), config, scan_layers=True)
    model = OPTForCausalLM(config, scan_layers=True)
    mesh = make_mesh(MeshConfig(*mesh_shape))
    from optiml_jax.sharding import abstract_params, logical_shardings

    shardings = logical_shardings(abstract_params(model), mesh)
    params = jax.device_put(params, shardings)
    ids = np.random.default_rng(0).integers(4, config.vocab_size, size=(8, 10))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf_model, ids), atol=1e-4, rtol=0)
