"""Generation: greedy equals HF `generate` token for token (every decode loop and KV-cache layout, with
repetition penalty too), sampling is seeded and follows the warped softmax, EOS handling, weights cast
once before the loop, and one compile per (batch, prompt bucket, budget bucket)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import hf_state_dict, make_config, make_hf_model

from optiml_jax import generate as gen
from optiml_jax.checkpoints.mapping import hf_to_params
from optiml_jax.generate import GenerationConfig, decode_plan, filter_logits, generate, sample_logits
from optiml_jax.model import OPTForCausalLM
from optiml_jax.model.opt import CACHE_LAYOUTS

PAD = 1


@functools.lru_cache(maxsize=None)
def _models(variant, scan_layers=True):
    config = make_config(variant)
    hf_model = make_hf_model(config, seed=11)
    params = jax.tree_util.tree_map(
        jnp.asarray, hf_to_params(hf_state_dict(hf_model), config, scan_layers=scan_layers)
    )
    return config, hf_model, OPTForCausalLM(config, scan_layers=scan_layers), params


def _left_padded_prompts(vocab_size, lengths=(5, 11, 2), seed=0):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.full((len(lengths), width), PAD)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rng.integers(4, vocab_size, n)
        mask[row, width - n :] = 1
    return ids, mask


def _hf_generate(hf_model, ids, mask, max_new_tokens, eos_token_id, min_new_tokens=0, **options):
    with torch.no_grad():
        out = hf_model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            pad_token_id=PAD,
            eos_token_id=eos_token_id,
            **options,
        )
    return out.numpy()[:, ids.shape[1] :]


def _padded_to(tokens, width):
    """HF's output once every row has finished is cut short; ours is padding to the budget."""
    return np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=PAD)


def _hf_logprobs(hf_model, ids, mask, generated):
    """log p(generated token) under HF's model, teacher-forced on prompt + generation."""
    full = np.concatenate([ids, generated], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(generated)], axis=1)
    with torch.no_grad():
        logits = hf_model(input_ids=torch.as_tensor(full), attention_mask=torch.as_tensor(full_mask)).logits
    log_probs = torch.log_softmax(logits.float(), -1).numpy()[:, ids.shape[1] - 1 : -1]
    return np.take_along_axis(log_probs, generated[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize(
    "variant,scan_layers",
    [("pre_ln", True), ("post_ln_350m", True), ("no_bias", False), ("untied_gelu", True)],
)
def test_forced_long_greedy_equals_hf_generate(variant, scan_layers):
    """min_new_tokens keeps EOS out on both sides, so every row runs the full budget."""
    config, hf_model, model, params = _models(variant, scan_layers)
    ids, mask = _left_padded_prompts(config.vocab_size)
    n = 20
    ours = generate(model, params, ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n)
    ref = _hf_generate(hf_model, ids, mask, n, config.eos_token_id, min_new_tokens=n)
    np.testing.assert_array_equal(ours.tokens, ref)
    np.testing.assert_array_equal(ours.lengths, [n] * len(ids))
    np.testing.assert_allclose(ours.logprobs, _hf_logprobs(hf_model, ids, mask, ref), atol=2e-5)


@pytest.mark.parametrize("cache_layout", CACHE_LAYOUTS)
def test_scanned_layer_stack_decodes_the_same_unsplit(monkeypatch, cache_layout):
    """On CPU a scanned model decodes with its layers split apart; the nn.scan decode path (used on
    accelerators, where the cache of every layer is one stacked array) must give the same tokens."""
    monkeypatch.setattr(gen, "decode_with_separate_layers", lambda model: False)
    config, hf_model, model, params = _models("post_ln_350m", True)
    ids, mask = _left_padded_prompts(config.vocab_size, seed=4)
    ours = generate(
        model,
        params,
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        min_new_tokens=10,
        cache_layout=cache_layout,
    )
    np.testing.assert_array_equal(ours.tokens, _hf_generate(hf_model, ids, mask, 10, 2, min_new_tokens=10))


@pytest.fixture(scope="module")
def eos_case():
    """A left-padded batch, an EOS that greedy decoding reaches mid-way in one row (so that row stops
    while the others go on), and HF's tokens for it."""
    config, hf_model, model, params = _models("post_ln_350m")  # its greedy rows vary (pre_ln's repeat)
    ids, mask = _left_padded_prompts(config.vocab_size, seed=0)
    free = generate(model, params, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None).tokens
    # the first token of row 1 from its 4th on that neither it nor another row produced before
    eos = next(
        int(t) for k, t in enumerate(free[1]) if k >= 3 and t not in free[1, :k] and t not in free[[0, 2]]
    )
    ref = _hf_generate(hf_model, ids, mask, 16, eos)
    assert (ref[1] == eos).any() and ref.shape[1] == 16  # row 1 stopped, the others ran on
    return ids, mask, eos, ref


@pytest.mark.parametrize(
    "loop,cache_layout", [(loop, layout) for loop in ("while", "fixed") for layout in CACHE_LAYOUTS]
)
def test_every_loop_and_cache_layout_equals_hf_generate(eos_case, loop, cache_layout):
    """Each plan a platform may pick gives HF's tokens, and a new budget in the same bucket reuses
    its program (the fixed loop runs the bucket's capacity, masked past the budget)."""
    config, hf_model, model, params = _models("post_ln_350m")
    ids, mask, eos, ref = eos_case
    run = functools.partial(
        generate,
        model,
        params,
        ids,
        attention_mask=mask,
        eos_token_id=eos,
        loop=loop,
        cache_layout=cache_layout,
    )
    ours = run(max_new_tokens=16)
    np.testing.assert_array_equal(ours.tokens, ref)
    np.testing.assert_array_equal(
        ours.lengths, [int(np.argmax(row == eos)) + 1 if (row == eos).any() else 16 for row in ref]
    )
    generated = ref[:, : ours.lengths.max()]
    hf_logprobs = np.where(
        np.arange(generated.shape[1]) < ours.lengths[:, None],
        _hf_logprobs(hf_model, ids, mask, generated),
        0.0,
    )
    np.testing.assert_allclose(ours.logprobs[:, : generated.shape[1]], hf_logprobs, atol=2e-5)
    programs = gen._generate_compiled._cache_size()
    shorter = run(max_new_tokens=7)
    assert gen._generate_compiled._cache_size() == programs
    np.testing.assert_array_equal(shorter.tokens, ref[:, :7])
    np.testing.assert_array_equal(shorter.lengths, np.minimum(ours.lengths, 7))


def test_repetition_penalty_equals_hf_generate():
    """HF's RepetitionPenaltyLogitsProcessor: prompt tokens (not the left padding) and generated ones
    are penalised, > 1 discouraging and < 1 encouraging repeats; the penalty is a runtime value."""
    config, hf_model, model, params = _models("untied_gelu")
    ids, mask = _left_padded_prompts(config.vocab_size, seed=5)
    n = 20
    plain = generate(model, params, ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n)
    programs = gen._generate_compiled._cache_size()
    for penalty in (1.8, 0.5):
        ours = generate(
            model,
            params,
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            repetition_penalty=penalty,
        )
        ref = _hf_generate(
            hf_model, ids, mask, n, config.eos_token_id, min_new_tokens=n, repetition_penalty=penalty
        )
        np.testing.assert_array_equal(ours.tokens, ref)
        assert (ours.tokens != plain.tokens).any()  # the penalty changed the choice somewhere
        # log-probs stay those of the unmodified model
        np.testing.assert_allclose(ours.logprobs, _hf_logprobs(hf_model, ids, mask, ref), atol=2e-5)
    assert gen._generate_compiled._cache_size() == programs


def _loop_bodies(jaxpr):
    """The jaxprs of every loop (while: its condition and body; scan) inside `jaxpr`, nested ones included."""
    for eqn in jaxpr.eqns:
        subs = [
            v
            for v in eqn.params.values()
            for v in (v if isinstance(v, (tuple, list)) else [v])
            if hasattr(v, "eqns") or hasattr(v, "jaxpr")
        ]
        for sub in subs:
            sub = sub.jaxpr if hasattr(sub, "jaxpr") else sub
            if eqn.primitive.name in ("while", "scan"):
                yield sub
            yield from _loop_bodies(sub)


def _converted_shapes(jaxpr, recurse=True):
    """Shapes of the float32 arrays converted to another dtype in `jaxpr` (and its sub-jaxprs)."""
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type" and eqn.invars[0].aval.dtype == jnp.float32:
            shapes.add(eqn.invars[0].aval.shape)
        if recurse:
            for param in eqn.params.values():
                for v in param if isinstance(param, (tuple, list)) else [param]:
                    if hasattr(v, "eqns") or hasattr(v, "jaxpr"):
                        shapes |= _converted_shapes(v.jaxpr if hasattr(v, "jaxpr") else v)
    return shapes


@pytest.mark.parametrize("loop", ["while", "fixed"])
def test_weights_are_cast_to_the_compute_dtype_once_before_the_loop(loop):
    """float32 weights with bfloat16 compute: no weight is converted inside the decode loop (each
    step would read the float32 copy again), every one is converted before it."""
    config, _, _, params = _models("pre_ln", False)
    model = OPTForCausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    weights = {
        leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key in ("kernel", "embedding")
    }
    ids = jnp.ones((2, 32), jnp.int32)
    traced = gen._generate_compiled.trace(
        model,
        params,
        ids,
        ids,
        jnp.int32(4),
        jnp.int32(0),
        jax.random.PRNGKey(0),
        jnp.float32(1.0),
        jnp.int32(0),
        jnp.float32(1.0),
        jnp.float32(1.0),
        jnp.zeros((config.vocab_size,), bool),
        new_tokens_capacity=32,
        do_sample=False,
        unstack_layers=False,
        eos_token_id=2,
        pad_token_id=PAD,
        loop=loop,
        cache_layout="cpu",
    )
    jaxpr = traced.jaxpr.jaxpr
    in_loop = set().union(*(_converted_shapes(body) for body in _loop_bodies(jaxpr)))
    assert in_loop and not weights & in_loop  # (activations are converted in the loop, weights not)
    assert weights <= _converted_shapes(jaxpr)


def test_auto_plan_is_per_platform_and_overridable():
    auto = GenerationConfig()
    assert decode_plan(auto, "cpu") == (gen.CPU_LOOP, "cpu")
    assert decode_plan(auto, "gpu") == decode_plan(auto, "tpu") == ("fixed", "standard")
    assert decode_plan(GenerationConfig(loop="while", cache_layout="cpu"), "gpu") == ("while", "cpu")
    assert decode_plan(GenerationConfig(loop="fixed", cache_layout="standard"), "cpu") == (
        "fixed",
        "standard",
    )


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_350m"])
def test_stop_at_eos_equals_hf_generate(variant):
    """EOS is chosen as a token that greedy decoding reaches mid-way in one row, so the stop is sure
    to happen: that row then holds padding while the others go on."""
    config, hf_model, model, params = _models(variant)
    ids, mask = _left_padded_prompts(config.vocab_size, seed=1)
    n = 16
    free = generate(model, params, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=None)
    eos = int(free.tokens[1, 5])
    ours = generate(model, params, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos)
    ref = _hf_generate(hf_model, ids, mask, n, eos)
    assert ref.shape[1] <= n
    np.testing.assert_array_equal(ours.tokens[:, : ref.shape[1]], ref)
    assert (ours.tokens[:, ref.shape[1] :] == PAD).all()  # HF stopped when every row had finished
    stopped = int(np.argmax(ours.tokens[1] == eos))
    assert stopped <= 5 and ours.lengths[1] == stopped + 1
    assert (ours.tokens[1, stopped + 1 :] == PAD).all() and (ours.logprobs[1, stopped + 1 :] == 0).all()
    assert ours.token_ids()[1][-1] == eos and len(ours.token_logprobs()[1]) == stopped + 1
    trimmed = [row[:length] for row, length in zip(ref.tolist(), ours.lengths)]
    assert ours.token_ids() == trimmed


def test_same_prompt_alone_and_in_a_padded_batch_agree():
    config, _, model, params = _models("pre_ln")
    ids, mask = _left_padded_prompts(config.vocab_size)
    batch = generate(model, params, ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6)
    alone = generate(model, params, [ids[2, -2:].tolist()], max_new_tokens=6, min_new_tokens=6)
    np.testing.assert_array_equal(batch.tokens[2], alone.tokens[0])


def test_sampling_is_seeded_and_degenerate_filters_equal_greedy():
    config, _, model, params = _models("pre_ln")
    ids, mask = _left_padded_prompts(config.vocab_size, seed=2)
    run = functools.partial(
        generate, model, params, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None
    )
    greedy = run()
    a, b, c = run(temperature=1.0, seed=3), run(temperature=1.0, seed=3), run(temperature=1.0, seed=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    assert (a.tokens != greedy.tokens).any()
    np.testing.assert_array_equal(run(temperature=1.5, top_k=1, seed=5).tokens, greedy.tokens)
    np.testing.assert_array_equal(run(temperature=1.5, top_p=1e-6, seed=6).tokens, greedy.tokens)
    # log-probs are under the unmodified model whatever the warping: equal tokens, equal log-probs
    np.testing.assert_allclose(run(temperature=0.3, top_k=1, seed=7).logprobs, greedy.logprobs, atol=1e-6)


def _chi_square(counts, probs):
    """Pearson statistic and degrees of freedom, bins with an expected count under 5 merged."""
    expected = probs * counts.sum()
    order = np.argsort(expected)
    small = order[np.cumsum(expected[order]) < 5]
    keep = np.setdiff1d(np.arange(len(probs)), small)
    obs = np.append(counts[keep], counts[small].sum())
    exp = np.append(expected[keep], expected[small].sum())
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


# 99.9% quantiles of chi-square: the tests are deterministic (fixed keys), this is the margin.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def test_temperature_top_k_top_p_sampling_follow_the_warped_softmax():
    logits = jnp.array([2.0, 1.2, 0.9, 0.3, -0.5, -1.0, -2.5, -4.0])
    draws = 40000
    batch = jnp.broadcast_to(logits, (draws, logits.shape[0]))
    key = jax.random.PRNGKey(0)

    def check(temperature, top_k, top_p, expected):
        tokens = np.asarray(
            sample_logits(key, batch, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        )
        counts = np.bincount(tokens, minlength=len(expected)).astype(float)
        assert counts[expected == 0].sum() == 0, "a filtered-out token was drawn"
        stat, dof = _chi_square(counts[expected > 0], expected[expected > 0])
        assert stat < CHI2_999[dof], (temperature, top_k, top_p, counts / draws, expected)

    softmax = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np_logits = np.asarray(logits, np.float64)
    check(0.7, 0, 1.0, softmax(np_logits / 0.7))
    check(2.0, 0, 1.0, softmax(np_logits / 2.0))
    top3 = np.where(np.arange(8) < 3, softmax(np_logits[:3] / 1.3).tolist() + [0] * 5, 0.0)
    check(1.3, 3, 1.0, top3)
    probs = softmax(np_logits)
    kept = (np.cumsum(probs) - probs) < 0.75  # the top-p set: mass before each kept token < p
    assert 1 < kept.sum() < 8
    check(1.0, 0, 0.75, np.where(kept, probs, 0) / probs[kept].sum())


def test_filter_logits_keeps_ties_and_at_least_one_token():
    logits = jnp.array([[1.0, 3.0, 3.0, 0.0]])
    assert np.isfinite(np.asarray(filter_logits(logits, 1, 1.0))).tolist() == [[False, True, True, False]]
    assert np.isfinite(np.asarray(filter_logits(logits, 0, 1e-9))).sum() >= 1
    np.testing.assert_array_equal(filter_logits(logits, 0, 1.0), logits)


def test_end_to_end_sampled_first_token_follows_softmax_of_model_logits():
    config, hf_model, model, params = _models("pre_ln")
    prompt = [2, 17, 33, 5]
    rows, temperature = 3000, 1.7
    out = generate(
        model, params, [prompt] * rows, max_new_tokens=1, temperature=temperature, seed=1, eos_token_id=None
    )
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([prompt])).logits[0, -1].double().numpy()
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    counts = np.bincount(out.tokens[:, 0], minlength=config.vocab_size).astype(float)
    stat, dof = _chi_square(counts, probs)
    # dof is large here: use the normal approximation's 99.9% point
    assert stat < dof + 3.1 * np.sqrt(2 * dof), (stat, dof)
    # and the reported log-prob is log softmax of the raw logits, not of logits / T
    log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    np.testing.assert_allclose(out.logprobs[:, 0], log_probs[out.tokens[:, 0]], atol=2e-5)


def test_new_prompt_length_or_budget_in_the_same_bucket_does_not_recompile():
    config, _, model, params = _models("pre_ln")
    rng = np.random.default_rng(3)
    prompts = lambda *lens: [rng.integers(4, config.vocab_size, n).tolist() for n in lens]
    generate(model, params, prompts(3, 7), max_new_tokens=5)
    trace_count = gen._generate_compiled._cache_size  # the programs compiled so far (jax.jit's cache)
    before = trace_count()
    generate(model, params, prompts(20, 9), max_new_tokens=5)  # longer prompts, same 32-token bucket
    generate(model, params, prompts(1, 30), max_new_tokens=17, min_new_tokens=3)  # same budget bucket
    assert trace_count() == before
    generate(model, params, prompts(40, 2), max_new_tokens=5)  # next prompt bucket: one new program
    assert trace_count() == before + 1
    generate(model, params, prompts(1, 2), max_new_tokens=5, temperature=0.8, top_k=5, seed=1)
    generate(model, params, prompts(4, 5), max_new_tokens=5, temperature=1.3, top_p=0.9, seed=2)
    assert trace_count() == before + 2  # sampling compiles once; its settings are runtime values


def test_bad_requests_are_refused_with_a_clear_message():
    config, _, model, params = _models("pre_ln")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, params, [[2, 5], []])
    with pytest.raises(
        ValueError, match="prompt 0 of 60 tokens plus max_new_tokens=5 exceeds the model's 64 pos"
    ):
        generate(model, params, [[2] * 60], max_new_tokens=5)
    with pytest.raises(ValueError, match="outside"):
        generate(model, params, [[2, 500]])
    with pytest.raises(TypeError, match="list of token-id lists"):
        generate(model, params, [2, 5, 7])
    for bad in (
        dict(max_new_tokens=0),
        dict(temperature=-1.0),
        dict(top_k=-2),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=5),
        dict(seed=-1),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=float("nan")),
        dict(loop="for"),
        dict(cache_layout="gpu"),
    ):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)
