"""The memory estimate: exact for sharded params, sensible for activations, and a clear refusal."""

import jax
import pytest
from hf_reference import make_config

from optiml_jax.config import OPTConfig
from optiml_jax.model import OPTForCausalLM
from optiml_jax.sharding import DEFAULT_RULES, MeshConfig, init_params_sharded, make_mesh
from optiml_jax.train.memory import (
    InsufficientMemoryError,
    check_fits,
    estimate_training_memory,
    sharded_param_bytes,
)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_param_bytes_equal_the_real_shards(mesh_shape):
    config = make_config("pre_ln", hidden_size=64, ffn_dim=128, vocab_size=128)
    mesh = make_mesh(MeshConfig(*mesh_shape))
    params, _ = init_params_sharded(OPTForCausalLM(config, scan_layers=True), jax.random.PRNGKey(0), mesh)
    real = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree_util.tree_leaves(params))
    estimate = sharded_param_bytes(config, dict(zip(("data", "fsdp", "tensor"), mesh_shape)), DEFAULT_RULES)
    assert estimate == real


def test_published_sizes_and_refusal():
    config = OPTConfig.from_preset("30b")
    one_gpu = estimate_training_memory(
        config,
        mesh_shape={"data": 1, "fsdp": 1, "tensor": 1},
        global_batch=8,
        seq_len=2048,
        remat_policy="full",
        compute_dtype="bfloat16",
    )
    # 30B params in float32: ~112 GiB, Adam moments twice that.
    assert 110 < one_gpu.params / 2**30 < 114
    assert one_gpu.optimizer == 2 * one_gpu.params
    with pytest.raises(InsufficientMemoryError, match=r"(?s)needs about .* GiB per device.*mesh"):
        check_fits(one_gpu, available=80 * 2**30)
    pod = estimate_training_memory(
        config,
        mesh_shape={"data": 1, "fsdp": 32, "tensor": 2},
        global_batch=256,
        seq_len=2048,
        grad_accum_steps=4,
        remat_policy="full",
        compute_dtype="bfloat16",
    )
    check_fits(pod, available=32 * 2**30)  # a TPU v4 pod slice chip: 32 GiB HBM
    assert "optimizer state" in pod.table()


def test_remat_policies_order_activation_memory():
    config = OPTConfig.from_preset("1.3b")
    sizes = {
        p: estimate_training_memory(
            config, mesh_shape={"data": 1}, global_batch=8, seq_len=2048, remat_policy=p
        ).activations
        for p in ("none", "dots", "dots_no_batch", "full")
    }
    assert sizes["full"] < sizes["dots_no_batch"] < sizes["dots"] < sizes["none"]


def test_frozen_parameters_have_no_gradient_or_optimizer_bytes():
    config = OPTConfig.from_preset("1.3b")
    common = dict(mesh_shape={"data": 1}, global_batch=8, seq_len=2048)
    everything = estimate_training_memory(config, **common)
    frozen_embeddings = estimate_training_memory(config, trainable=r"^(?!.*embed_)", **common)
    embedding_bytes = 4 * (config.vocab_size + config.max_position_embeddings + 2) * config.hidden_size
    # Parameters and activations are the same; gradients and both Adam moments leave the embeddings out.
    assert frozen_embeddings.params == everything.params
    assert frozen_embeddings.activations == everything.activations
    assert everything.grads - frozen_embeddings.grads == embedding_bytes
    assert everything.optimizer - frozen_embeddings.optimizer == 2 * embedding_bytes
    only_fc = estimate_training_memory(config, trainable=lambda path: "/fc" in path, **common)
    fc_bytes = (
        4
        * config.num_hidden_layers
        * (2 * config.hidden_size * config.ffn_dim + config.ffn_dim + config.hidden_size)
    )
    assert only_fc.grads == fc_bytes and only_fc.optimizer == 2 * fc_bytes
