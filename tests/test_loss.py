"""The fused LM head + cross-entropy: against the plain logits-then-CE computation, and the training loss
and every parameter's gradient against HF PyTorch OPT (the loss of `labels`), for every variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import VARIANTS, hf_state_dict, make_config, make_hf_model

from optiml_jax.checkpoints.mapping import hf_to_params
from optiml_jax.model import OPTForCausalLM
from optiml_jax.train import lm_loss
from optiml_jax.train import loss as loss_module
from optiml_jax.train.loss import capacities_for, weighted_head_cross_entropy


def _inputs(batch=3, length=20, d=16, vocab=50, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(k[0], (batch, length, d))
    head = 0.3 * jax.random.normal(k[1], (vocab, d))
    targets = jax.random.randint(k[2], (batch, length), 0, vocab)
    mask = (jax.random.uniform(k[3], (batch, length)) > 0.3).astype(jnp.float32)
    return hidden, head, targets, mask / mask.sum()


def cross_entropy(logits, targets):
    """Per-token CE in float32, the plain way: logsumexp(logits) - logits[target]."""
    logits = logits.astype(jnp.float32)
    return (
        jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    )


def _plain(hidden, head, targets, weights):
    return jnp.sum(cross_entropy(jnp.einsum("bsd,vd->bsv", hidden, head), targets) * weights)


@pytest.mark.parametrize(
    "chunk", [1, 5, 7, 20, 128]
)  # 7 does not divide 20: the next smaller divisor is used
def test_fused_loss_and_gradients_equal_logits_then_cross_entropy(chunk):
    hidden, head, targets, weights = _inputs()
    want, want_grads = jax.value_and_grad(_plain, argnums=(0, 1))(hidden, head, targets, weights)
    fused = jax.jit(lambda h, e: weighted_head_cross_entropy(h, e, targets, weights, chunk=chunk))
    got, got_grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(hidden, head)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(fused(hidden, head), want, rtol=1e-6)  # the forward-only path
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-7, rtol=1e-5)
    # A cotangent other than 1 scales both gradients (the backward pass only rescales).
    scaled = jax.grad(lambda h, e: 3.0 * fused(h, e), argnums=(0, 1))(hidden, head)
    for g, w in zip(scaled, want_grads):
        np.testing.assert_allclose(g, 3.0 * w, atol=1e-6, rtol=1e-5)


def _sparse_weights(batch, length, per_row, seed=0):
    """Weights with `per_row` weighted positions in row 0 (at random places) and fewer in the others."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch):
        mask[b, rng.choice(length, size=max(per_row - b, 0), replace=False)] = 1.0
    return jnp.asarray(mask / max(mask.sum(), 1.0))


def test_the_head_runs_on_the_fewest_positions_that_hold_every_weighted_one():
    batch, length = 3, 64
    assert capacities_for(length) == (4, 8, 16, 32)
    hidden, head, targets, _ = _inputs(batch, length)
    # Which branch runs, seen from inside: a stand-in for the head that returns how many positions it got.
    branch = jax.jit(
        lambda w: loss_module._on_weighted_positions(
            lambda h, e, t, w, size: jnp.float32(h.shape[1]),
            hidden,
            head,
            targets,
            w,
            128,
            capacities_for(length),
            False,
        )
    )
    fused = {
        positions: jax.jit(
            lambda w, positions=positions: jax.value_and_grad(
                lambda h, e: weighted_head_cross_entropy(h, e, targets, w, positions=positions),
                argnums=(0, 1),
            )(hidden, head)
        )
        for positions in ("weighted", "all")
    }
    forward = jax.jit(lambda w: weighted_head_cross_entropy(hidden, head, targets, w))
    plain = jax.jit(jax.value_and_grad(_plain, argnums=(0, 1)))
    # per_row: the most weighted positions in a row (the other rows have fewer) -> positions gathered
    for per_row, capacity in [
        (0, 4),
        (1, 4),
        (4, 4),
        (5, 8),
        (8, 8),
        (9, 16),
        (17, 32),
        (32, 32),
        (33, 64),
        (64, 64),
    ]:
        weights = _sparse_weights(batch, length, per_row)
        assert int(branch(weights)) == capacity, per_row
        # The loss and both gradients are those of the plain computation, whichever branch runs.
        want, want_grads = plain(hidden, head, targets, weights)
        np.testing.assert_allclose(forward(weights), want, rtol=1e-6, atol=1e-7)
        for positions, fn in fused.items():
            value, grads = fn(weights)
            np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7, err_msg=f"{per_row} {positions}")
            for g, w in zip(grads, want_grads):
                np.testing.assert_allclose(g, w, atol=1e-7, rtol=1e-5, err_msg=f"{per_row} {positions}")
    with pytest.raises(ValueError, match="positions must be one of"):
        weighted_head_cross_entropy(hidden, head, targets, weights, positions="some")


def test_fused_loss_in_bfloat16_accumulates_in_float32():
    hidden, head, targets, weights = _inputs(vocab=500)
    want = _plain(hidden, head, targets, weights)
    got = weighted_head_cross_entropy(hidden.astype(jnp.bfloat16), head, targets, weights)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-2)
    d_hidden = jax.grad(lambda h: weighted_head_cross_entropy(h, head, targets, weights))(
        hidden.astype(jnp.bfloat16)
    )
    assert d_hidden.dtype == jnp.bfloat16


def test_fused_loss_rejects_mismatched_shapes():
    hidden, head, targets, weights = _inputs()
    with pytest.raises(ValueError, match="targets/weights"):
        weighted_head_cross_entropy(hidden, head, targets[:, :5], weights)
    with pytest.raises(ValueError, match="head must be"):
        weighted_head_cross_entropy(hidden, head.T, targets, weights)


def _hf_loss_and_grads(hf_model, ids, mask):
    """HF's causal-LM loss (mean CE over labels != -100) and its gradients, named as in the state dict."""
    inputs = torch.as_tensor(ids[:, :-1], dtype=torch.long)
    labels = torch.as_tensor(ids[:, :-1], dtype=torch.long).clone()
    # HF predicts labels[t + 1] at position t: position t's target is ours only where mask[t] is set.
    labels[:, 1:][torch.as_tensor(mask[:, :-1] == 0)] = -100
    labels[:, 0] = -100
    hf_model.zero_grad()
    loss = hf_model(input_ids=inputs, labels=labels).loss
    loss.backward()
    grads = {name: p.grad.detach().numpy() for name, p in hf_model.named_parameters()}
    state = hf_state_dict(hf_model)
    for name in state:  # a tied lm_head.weight is the embedding itself (named once by named_parameters)
        grads.setdefault(
            name,
            grads.get("model.decoder.embed_tokens.weight")
            if name == "lm_head.weight"
            else np.zeros_like(state[name]),
        )
    return loss.item(), grads


@pytest.mark.parametrize("mask_kind", ["dense", "targets"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_loss_and_every_gradient_match_hf(variant, mask_kind):
    config = make_config(variant)
    hf_model = make_hf_model(config)
    rng = np.random.default_rng(1)
    batch, length = 2, 17
    ids = rng.integers(3, config.vocab_size, size=(batch, length + 1))
    if mask_kind == "dense":  # 70% of positions: the head runs on every position
        mask = (rng.random((batch, length)) > 0.3).astype(np.float32)
    else:  # a short target after a prompt, as in instruction data: the head runs on 4 gathered positions
        mask = np.zeros((batch, length), np.float32)
        mask[0, 9:13] = mask[1, 12:15] = 1.0
    mask[:, -1] = 0.0  # HF's input has no next token for the last position
    want_loss, hf_grads = _hf_loss_and_grads(hf_model, ids, mask)

    model = OPTForCausalLM(config)
    params = hf_to_params(hf_state_dict(hf_model), config)
    data = {
        "input_ids": jnp.asarray(ids[:, :-1]),
        "targets": jnp.asarray(ids[:, 1:]),
        "positions": jnp.broadcast_to(jnp.arange(length), (batch, length)),
        "segment_ids": jnp.ones((batch, length), jnp.int32),
        "loss_mask": jnp.asarray(mask),
    }
    loss, grads = jax.value_and_grad(lambda p: lm_loss(model, p, data, data["loss_mask"] / mask.sum(), True))(
        params
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    want_grads = hf_to_params(hf_grads, config)
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want_grads)[0])
    flat_got = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat_got) == len(flat_want)
    for path, got in flat_got:
        want = flat_want[path]
        # k_proj's bias has an exactly zero gradient (it shifts all of a query's scores equally): both
        # sides give rounding noise there, so the scale has a floor.
        scale = max(float(np.abs(want).max()), 1e-3)
        np.testing.assert_allclose(
            np.asarray(got) / scale, np.asarray(want) / scale, atol=2e-5, err_msg=jax.tree_util.keystr(path)
        )


def test_head_gradient_is_reduced_across_devices_once_not_per_chunk():
    """With the batch split over devices, each shard accumulates its own partial d/dhead in the loop
    and the shards are summed after it: no vocab x d collective inside the loop body."""
    import re

    import flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    from optiml_jax.sharding import DEFAULT_RULES, MeshConfig, make_mesh

    batch, length, d, vocab = 8, 512, 32, 1000
    mesh = make_mesh(MeshConfig(4, 1, 2), devices=jax.devices()[:8])
    spec = lambda *axes: NamedSharding(mesh, PartitionSpec(*axes))  # noqa: E731
    args = (
        jax.ShapeDtypeStruct((batch, length, d), jnp.float32, sharding=spec(("data", "fsdp"))),
        jax.ShapeDtypeStruct((vocab, d), jnp.float32, sharding=spec("tensor")),
        jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=spec(("data", "fsdp"))),
        jax.ShapeDtypeStruct((batch, length), jnp.float32, sharding=spec(("data", "fsdp"))),
    )
    grad = jax.jit(jax.grad(weighted_head_cross_entropy, argnums=(0, 1)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        hlo = grad.lower(*args).compile().as_text()
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    assert bodies, "the chunk loop is gone"
    computations = {
        m.group(1): m.group(2) for m in re.finditer(r"(?ms)^%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo)
    }
    in_loop = [
        line
        for name in bodies
        for line in computations.get(name, "").splitlines()
        if re.search(r" (all-reduce|reduce-scatter|all-gather)(-start)?\(", line)
    ]
    local_vocab = vocab // 2
    assert not [line for line in in_loop if re.search(rf"f32\[(\d+,)?{local_vocab},{d}\]", line)], in_loop
    # ...and the gradients are still right on this mesh.
    hidden, head, targets, weights = _inputs(batch, length, d, vocab)
    want = jax.grad(_plain, argnums=(0, 1))(hidden, head, targets, weights)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        got = grad(*(jax.device_put(x, a.sharding) for x, a in zip((hidden, head, targets, weights), args)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-7, rtol=1e-4)
