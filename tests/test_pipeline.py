"""`optiml_jax.pipeline("text-generation", ...)` (module optiml_jax.pipelines) against transformers' own pipeline on a tiny model dir."""
import pytest
import transformers

from optiml_jax import pipeline

from test_generate_cli import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory):
    return make_tiny_model_dir(tokenizer_dir, tmp_path_factory.mktemp("tiny_opt_pipeline"))


@pytest.fixture(scope="module")
def generator(model_dir):
    return pipeline("text-generation", model=str(model_dir))


PROMPTS = ["What is the capital of USA?", "Input: café au lait. Output:", "Hi"]


def test_greedy_text_equals_transformers_pipeline(generator, model_dir):
    reference = transformers.pipeline("text-generation", model=str(model_dir), device="cpu")
    for prompt in PROMPTS:
        ours = generator(prompt, max_new_tokens=8)
        theirs = reference(prompt, max_new_tokens=8, do_sample=False)
        assert ours == [{"generated_text": theirs[0]["generated_text"]}]
        assert ours[0]["generated_text"].startswith(prompt)


def test_list_input_return_full_text_and_sampling(generator):
    full = generator(PROMPTS, max_new_tokens=6)
    assert len(full) == 3 and all(len(item) == 1 for item in full)
    assert full[1] == generator(PROMPTS[1], max_new_tokens=6)  # batched = alone (left padding is exact)
    new_only = generator(PROMPTS, max_new_tokens=6, return_full_text=False)
    for prompt, a, b in zip(PROMPTS, full, new_only):
        assert a[0]["generated_text"] == prompt + b[0]["generated_text"]
    sampled = generator(PROMPTS[0], do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=6, seed=4)
    assert sampled == generator(PROMPTS[0], do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=6,
                                seed=4)
    assert sampled[0]["generated_text"].startswith(PROMPTS[0])
    # greedy ignores sampling settings, as transformers does
    assert generator(PROMPTS[0], max_new_tokens=6, top_k=3) == full[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unsupported task"):
        pipeline("summarization", model="x")
    with pytest.raises(ValueError, match="needs model="):
        pipeline("text-generation")
