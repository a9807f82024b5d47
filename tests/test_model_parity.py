"""Logits of our Flax OPT against transformers' PyTorch OPTForCausalLM (float32, random tiny models)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import VARIANTS, hf_logits, hf_state_dict, make_config, make_hf_model

from optiml_jax.checkpoints.mapping import hf_to_params
from optiml_jax.model import OPTForCausalLM

ATOL = 1e-4


def _ours(config, hf_model, scan_layers, **kwargs):
    params = hf_to_params(hf_state_dict(hf_model), config, scan_layers=scan_layers)
    model = OPTForCausalLM(config, scan_layers=scan_layers, **kwargs)
    return model, params


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_hf(variant, scan_layers):
    config = make_config(variant)
    hf_model = make_hf_model(config)
    ids = np.random.default_rng(1).integers(4, config.vocab_size, size=(2, 11))
    model, params = _ours(config, hf_model, scan_layers)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    ref = hf_logits(hf_model, ids)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_350m"])
def test_left_padded_batch_matches_hf(variant, scan_layers):
    config = make_config(variant)
    hf_model = make_hf_model(config, seed=3)
    rng = np.random.default_rng(2)
    ids = rng.integers(4, config.vocab_size, size=(3, 9))
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding of different lengths
    mask[1, :1] = 0
    ids = np.where(mask == 1, ids, config.pad_token_id)
    model, params = _ours(config, hf_model, scan_layers)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(hf_model, ids, mask)
    real = mask.astype(bool)  # padding positions' outputs are never used by anyone
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)
    # A left-padded row computes exactly what the same row computes unpadded.
    alone = np.asarray(model.apply({"params": params}, jnp.asarray(ids[:1, 4:])))
    np.testing.assert_allclose(ours[0, 4:], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_350m"])
def test_long_left_padded_batch_matches_hf_across_causal_query_blocks(variant):
    """300 tokens: three query blocks of causal attention (128, 128, 44), left padding crossing a block."""
    from optiml_jax.model.kernels.blockwise import CAUSAL_QUERY_BLOCK

    length = 300
    assert length > 2 * CAUSAL_QUERY_BLOCK
    config = make_config(variant, max_position_embeddings=320)
    hf_model = make_hf_model(config, seed=5)
    ids = np.random.default_rng(3).integers(4, config.vocab_size, size=(2, length))
    mask = np.ones_like(ids)
    mask[1, :140] = 0
    ids = np.where(mask == 1, ids, config.pad_token_id)
    model, params = _ours(config, hf_model, True)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(hf_model, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)


def _reference_attention(q, k, v, mask, keep=None, rate=0.0):
    """Plain softmax attention, differentiated by JAX's autodiff: the check on our hand-written VJP."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    if keep is not None:
        probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal_blocks", "one_block"])
def test_attention_outputs_and_gradients_match_autodiff(causal, dropout):
    """Packed rows (segments, trailing padding), three causal query blocks (64, 64, 72): our attention
    with its recomputing VJP equals plain softmax attention under autodiff at every non-padding
    query, values and gradients, with attention dropout drawing the same masks."""
    from optiml_jax.model.kernels.blockwise import _dropout_keep, blockwise_attention
    from optiml_jax.model.masks import attention_mask_for

    rng = np.random.default_rng(0)
    batch, length, heads, head_dim, block = 2, 200, 3, 8, 64
    q, k, v = (
        jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32) for _ in range(3)
    )
    segments = np.zeros((batch, length), np.int32)
    segments[0, :70], segments[0, 70:190] = 1, 2  # 10 padding tokens at the end
    segments[1, :] = 1
    valid = jnp.asarray(segments > 0)
    mask = attention_mask_for(length, jnp.ones((batch, length), bool), 0, jnp.asarray(segments))
    weight = jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32)
    dropout_rng = jax.random.PRNGKey(7)
    keep = None
    if dropout:  # the masks our attention draws, block by block, laid out over all keys
        starts = range(0, length, block) if causal else [0]
        keep = np.zeros((batch, heads, length, length), bool)
        for index, start in enumerate(starts):
            end = min(start + block, length) if causal else length
            keep[:, :, start:end, :end] = _dropout_keep(
                dropout_rng, index, dropout, (batch, heads, end - start, end)
            )
        assert 0.6 < keep[np.asarray(mask[:, :, :, :]).repeat(heads, 1)].mean() < 0.8

    def loss(attention, q, k, v):
        out = attention(q, k, v)
        return jnp.sum(jnp.where(valid[:, :, None, None], out * weight, 0.0)), out

    ours = functools.partial(
        blockwise_attention,
        mask=mask,
        causal=causal,
        query_block=block,
        dropout_rate=dropout,
        dropout_rng=dropout_rng,
        deterministic=not dropout,
    )
    reference = functools.partial(_reference_attention, mask=mask, keep=keep, rate=dropout)
    (l_ours, out_ours), g_ours = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(ours, q, k, v)
    (l_ref, out_ref), g_ref = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(reference, q, k, v)
    real = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out_ours)[real], np.asarray(out_ref)[real], atol=1e-5)
    np.testing.assert_allclose(float(l_ours), float(l_ref), rtol=1e-5)
    for name, a, b in zip("qkv", g_ours, g_ref):
        assert float(jnp.max(jnp.abs(b))) > 0.1, name  # a gradient that could be wrong
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=f"d/d{name}")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_layer_norm_values_and_gradients_match_torch(affine):
    """Our LayerNorm (hand-written backward pass) against torch.nn.functional.layer_norm, on rows
    with a large mean (where a one-pass variance would lose digits)."""
    import torch

    from optiml_jax.model.layers import LayerNorm

    rng = np.random.default_rng(0)
    features = 48
    x = (rng.standard_normal((3, 7, features)) * 2.0 + 30.0).astype(np.float32)
    d_out = rng.standard_normal(x.shape).astype(np.float32)
    scale = (1.0 + 0.5 * rng.standard_normal(features)).astype(np.float32)
    bias = rng.standard_normal(features).astype(np.float32)
    layer = LayerNorm(epsilon=1e-5, affine=affine, dtype=jnp.float32, param_dtype=jnp.float32)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}} if affine else {}
    import flax.linen as nn

    initial = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), jnp.asarray(x)))
    assert jax.tree.structure(initial) == jax.tree.structure(params)  # flax's names: scale, bias

    def loss(p, x):
        out = layer.apply(p, x)
        return jnp.sum(out * d_out), out

    (_, out), (d_params, d_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, jnp.asarray(x))
    x_t = torch.tensor(x, requires_grad=True)
    scale_t = torch.tensor(scale, requires_grad=True) if affine else None
    bias_t = torch.tensor(bias, requires_grad=True) if affine else None
    out_t = torch.nn.functional.layer_norm(x_t, (features,), scale_t, bias_t, 1e-5)
    (out_t * torch.tensor(d_out)).sum().backward()
    np.testing.assert_allclose(np.asarray(out), out_t.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_x), x_t.grad.numpy(), atol=1e-5)
    if affine:
        np.testing.assert_allclose(np.asarray(d_params["params"]["scale"]), scale_t.grad.numpy(), atol=1e-4)
        np.testing.assert_allclose(np.asarray(d_params["params"]["bias"]), bias_t.grad.numpy(), atol=1e-4)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_does_not_change_logits_or_grads(policy):
    config = make_config("pre_ln")
    hf_model = make_hf_model(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(4, config.vocab_size, size=(2, 7)))
    plain, params = _ours(config, hf_model, True)
    remat = OPTForCausalLM(config, scan_layers=True, remat_policy=policy)

    def loss(model, p):
        return model.apply({"params": p}, ids).astype(jnp.float32).mean()

    np.testing.assert_allclose(loss(plain, params), loss(remat, params), atol=1e-6)
    g1 = jax.grad(lambda p: loss(plain, p))(params)
    g2 = jax.grad(lambda p: loss(remat, p))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_packed_segments_equal_separate_sequences():
    """Packed examples with segment ids and restarted positions compute what each computes alone."""
    config = make_config("pre_ln")
    model, params = _ours(config, make_hf_model(config), False)
    rng = np.random.default_rng(5)
    a, b = rng.integers(4, config.vocab_size, size=5), rng.integers(4, config.vocab_size, size=4)
    packed = np.concatenate([a, b, [1, 1]])[None]
    segments = np.array([[1] * 5 + [2] * 4 + [0, 0]])
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0]])
    out = np.asarray(
        model.apply(
            {"params": params},
            jnp.asarray(packed),
            position_ids=jnp.asarray(positions),
            segment_ids=jnp.asarray(segments),
        )
    )
    alone_a = np.asarray(model.apply({"params": params}, jnp.asarray(a[None])))
    alone_b = np.asarray(model.apply({"params": params}, jnp.asarray(b[None])))
    np.testing.assert_allclose(out[0, :5], alone_a[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out[0, 5:9], alone_b[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_compute_stays_close(dtype):
    config = make_config("pre_ln")
    hf_model = make_hf_model(config)
    ids = np.random.default_rng(1).integers(4, config.vocab_size, size=(2, 11))
    model, params = _ours(config, hf_model, True, dtype=dtype)
    out = model.apply({"params": params}, jnp.asarray(ids))
    assert out.dtype == dtype
    assert jax.tree_util.tree_leaves(params)[0].dtype == np.float32  # master weights stay float32
    np.testing.assert_allclose(np.asarray(out, np.float32), hf_logits(hf_model, ids), atol=0.05)


def test_weights_errors_name_the_key():
    from optiml_jax.checkpoints.mapping import WeightsError

    config = make_config("pre_ln")
    sd = hf_state_dict(make_hf_model(config))
    bad = dict(sd)
    bad.pop("model.decoder.layers.1.fc1.weight")
    with pytest.raises(WeightsError, match=r"missing.*decoder\.layers\.1\.fc1\.weight"):
        hf_to_params(bad, config)
    bad = dict(sd, **{"model.decoder.layers.1.fc1.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(WeightsError, match=r"decoder\.layers\.1\.fc1\.weight has shape \(3, 3\)"):
        hf_to_params(bad, config)
    bad = dict(sd, **{"model.decoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match=r"unexpected.*decoder\.extra\.weight"):
        hf_to_params(bad, config)
    # keys without the "model." prefix and without lm_head (tied) load the same
    stripped = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    a = hf_to_params(sd, config)
    b = hf_to_params(stripped, config)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
