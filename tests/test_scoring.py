"""Log-likelihood scoring against HF PyTorch OPTForCausalLM on the same weights (float32): packed rows with
shared contexts, truncation, very different lengths, the greedy flag, lm_eval's text conventions, and a
sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from finetune_helpers import TOKENIZER
from hf_reference import hf_state_dict, make_config, make_hf_model

from optiml_jax import Scorer, score
from optiml_jax.checkpoints.mapping import hf_to_params
from optiml_jax.eval.scoring import encode_pair
from optiml_jax.model import OPTForCausalLM
from optiml_jax.sharding import MeshConfig, make_mesh
from optiml_jax.tokenizer import OPTTokenizer

LIMIT = 64  # hf_reference.TINY's positions


@pytest.fixture(scope="module", params=["pre_ln", "post_ln_350m"])
def pair(request):
    config = make_config(request.param)
    hf = make_hf_model(config, seed=1)
    params = jax.tree_util.tree_map(jnp.asarray, hf_to_params(hf_state_dict(hf), config, scan_layers=True))
    return hf, OPTForCausalLM(config, scan_layers=True), params


def hf_score(hf, context, continuation):
    """lm_eval's hf model: the input is (context + continuation)[-(max_length + 1):][:-1]."""
    full = (list(context) + list(continuation))[-(LIMIT + 1) :]
    with torch.no_grad():
        log_probs = torch.log_softmax(hf(input_ids=torch.tensor([full[:-1]])).logits.float(), -1)[0]
    n = len(continuation)
    target = torch.tensor(full[-n:])
    return (
        float(log_probs[-n:].gather(-1, target[:, None]).sum()),
        bool((log_probs[-n:].argmax(-1) == target).all()),
    )


def random_groups(seed):
    rng = np.random.default_rng(seed)
    # very short and long contexts, one-token options, and contexts cut to fit (70 + n > 65)
    shapes = [(5, [1, 3, 2]), (40, [4]), (70, [3, 1]), (1, [2]), (60, [10, 1, 6]), (2, [30])]
    return [
        (rng.integers(4, 90, n).tolist(), [rng.integers(4, 90, k).tolist() for k in options])
        for n, options in shapes
    ]


def test_scores_equal_hf_for_every_pair(pair):
    hf, model, params = pair
    groups = random_groups(0)
    # a continuation that IS the greedy one, so the flag must come out True at least once
    context = groups[1][0]
    with torch.no_grad():
        greedy_next = int(hf(input_ids=torch.tensor([context])).logits[0, -1].argmax())
    groups.append((context, [[greedy_next]]))
    scorer = Scorer(model, params, batch_size=2, row_length=32)
    got = scorer.score_groups(groups)
    for (context, options), scores in zip(groups, got):
        for option, result in zip(options, scores):
            logprob, greedy = hf_score(hf, context, option)
            assert result.logprob == pytest.approx(logprob, abs=1e-4)
            assert result.tokens == len(option) and result.is_greedy == greedy
    assert got[-1][0].is_greedy
    # few compiled shapes for many requests: row and scored-position buckets
    assert len(scorer.shapes) <= 3


def test_shared_context_equals_each_pair_alone(pair):
    _, model, params = pair
    context, options = [5, 17, 33, 8, 60, 2, 9], [[3], [44, 12], [7, 7, 7, 7], [81]]
    shared = Scorer(model, params, batch_size=1).score_options(context, options)
    alone = [Scorer(model, params, batch_size=1).score([(context, option)])[0] for option in options]
    for a, b in zip(shared, alone):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and a.is_greedy == b.is_greedy


def test_data_parallel_mesh_gives_the_same_scores():
    config = make_config("pre_ln")
    hf = make_hf_model(config, seed=2)
    params = jax.tree_util.tree_map(jnp.asarray, hf_to_params(hf_state_dict(hf), config, scan_layers=True))
    model = OPTForCausalLM(config, scan_layers=True)
    groups = random_groups(1)
    mesh = make_mesh(MeshConfig(data=4), devices=jax.devices()[:4])
    sharded = Scorer(model, params, batch_size=4, row_length=32, mesh=mesh).score_groups(groups)
    single = Scorer(model, params, batch_size=1, row_length=32).score_groups(groups)
    for a, b in zip(sharded, single):
        np.testing.assert_allclose([s.logprob for s in a], [s.logprob for s in b], atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the mesh's data-parallel devices"):
        Scorer(model, params, batch_size=6, mesh=mesh)


def test_text_pairs_follow_lm_evals_encoding():
    tokenizer = OPTTokenizer.from_pretrained(TOKENIZER)
    # trailing spaces of the context move into the continuation; </s> first, as OPT's HF tokenizer does
    context_ids, continuation_ids = encode_pair(tokenizer, "The capital of France is ", "Paris")
    assert context_ids == tokenizer.encode("The capital of France is")
    assert context_ids + continuation_ids == tokenizer.encode("The capital of France is Paris")
    assert context_ids[0] == tokenizer.bos_id
    assert encode_pair(tokenizer, "", "Paris") == (
        [tokenizer.bos_id],
        tokenizer.encode("Paris", add_bos=False),
    )
    assert encode_pair(tokenizer, "Q", "A", add_bos=False)[0] == tokenizer.encode("Q", add_bos=False)

    config = make_config("pre_ln", vocab_size=2048)
    hf = make_hf_model(config, seed=3)
    params = jax.tree_util.tree_map(jnp.asarray, hf_to_params(hf_state_dict(hf), config, scan_layers=False))
    results = score(
        OPTForCausalLM(config), params, tokenizer, [("The capital of France is ", "Paris"), ("", "Hi")]
    )
    for (context, continuation), result in zip([("The capital of France is ", "Paris"), ("", "Hi")], results):
        assert result.logprob == pytest.approx(
            hf_score(hf, *encode_pair(tokenizer, context, continuation))[0], abs=1e-4
        )
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        Scorer(OPTForCausalLM(config), params).score([([2], list(range(4, 70)))])
