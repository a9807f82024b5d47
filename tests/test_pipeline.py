"""`optiml_jax.pipeline("text-generation", ...)` (module optiml_jax.pipelines) against transformers' own
pipeline on a tiny model dir."""

import jax
import pytest
import transformers
from test_generate_cli import make_tiny_model_dir

from optiml_jax import pipeline
from optiml_jax.cli import generate as generate_cli
from optiml_jax.sharding import MeshConfig, make_mesh


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory):
    return make_tiny_model_dir(tokenizer_dir, tmp_path_factory.mktemp("tiny_opt_pipeline"))


@pytest.fixture(scope="module")
def generator(model_dir):
    """Prompts start with </s> as transformers' OPT tokenizer starts them: the HF-parity switch."""
    return pipeline("text-generation", model=str(model_dir), add_bos=True)


@pytest.fixture(scope="module")
def reference(model_dir):
    return transformers.pipeline("text-generation", model=str(model_dir), device="cpu")


PROMPTS = ["What is the capital of USA?", "Input: café au lait. Output:", "Hi"]


def test_greedy_text_equals_transformers_pipeline(generator, reference):
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
    assert sampled == generator(
        PROMPTS[0], do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=6, seed=4
    )
    assert sampled[0]["generated_text"].startswith(PROMPTS[0])
    # greedy ignores sampling settings, as transformers does
    assert generator(PROMPTS[0], max_new_tokens=6, top_k=3) == full[0]


def test_bad_arguments(generator):
    with pytest.raises(ValueError, match="unsupported task"):
        pipeline("summarization", model="x")
    with pytest.raises(ValueError, match="needs model="):
        pipeline("text-generation")
    with pytest.raises(
        ValueError, match="a prompt of 11 tokens leaves nothing to generate under max_length=11"
    ):
        generator(PROMPTS[0], max_length=11)  # transformers refuses it too
    for bad in (
        dict(num_return_sequences=0),
        dict(batch_size=0),
        dict(max_length=0),
        dict(stop_sequence=""),
        dict(repetition_penalty=0.0),
        dict(max_new_tokens=0),
    ):
        with pytest.raises(ValueError):
            generator(PROMPTS[0], **bad)


# Stop strings that the tiny model's greedy continuations of PROMPTS reach: within one token, across
# two, and starting in the prompt ("USA? c", ": w", "i 1"); which one fires, where, is transformers'.
STOPS = [["classify", "d w", "78 1"], ["ify cl", "word", "8"], ["USA? c", ": w", "i 1"]]


@pytest.mark.parametrize(
    "options",
    [
        dict(max_new_tokens=12, repetition_penalty=1.5),
        dict(max_new_tokens=12, repetition_penalty=0.7),
        *(dict(max_new_tokens=12, stop_sequence=stops) for stops in STOPS),
        dict(max_length=16),
        dict(max_length=9, max_new_tokens=6),
    ],
    ids=[
        "penalty>1",
        "penalty<1",
        "stops-1",
        "stops-2",
        "stops-from-prompt",
        "max_length",
        "max_length-cuts-prompt",
    ],
)
def test_greedy_options_equal_transformers_pipeline_in_any_batch(generator, reference, options):
    """Each prompt alone through transformers' pipeline; ours in batches of 2 (one padded pair, one
    single): batching, and rows of one batch stopping or running out at different points, change nothing."""
    theirs = [reference(prompt, do_sample=False, **options) for prompt in PROMPTS]
    assert generator(PROMPTS, batch_size=2, **options) == theirs
    if "stop_sequence" in options or "repetition_penalty" in options:  # the option did something
        plain = [reference(prompt, do_sample=False, max_new_tokens=12) for prompt in PROMPTS]
        assert theirs != plain


def test_num_return_sequences(generator, reference):
    with pytest.raises(ValueError, match="Greedy methods"):
        reference(PROMPTS[0], num_return_sequences=2, do_sample=False)
    with pytest.raises(ValueError, match="Greedy methods"):
        generator(PROMPTS[0], num_return_sequences=2)
    sample = dict(do_sample=True, num_return_sequences=3, max_new_tokens=8)
    ours = generator(PROMPTS, seed=1, batch_size=1, **sample)  # 3 rows a batch: one program for the test
    theirs = reference(PROMPTS, **sample)
    assert [len(x) for x in ours] == [len(x) for x in theirs] == [3, 3, 3]
    for prompt, samples in zip(PROMPTS, ours):
        texts = [s["generated_text"] for s in samples]
        assert all(t.startswith(prompt) for t in texts) and len(set(texts)) == 3  # distinct random streams
    assert generator(PROMPTS, seed=1, batch_size=1, **sample) == ours
    single = generator(PROMPTS[0], seed=1, **sample)
    assert single == ours[0]  # the same rows, the same seed
    assert (
        [list(d) for d in single]
        == [["generated_text"]] * 3
        == [list(d) for d in reference(PROMPTS[0], **sample)]
    )


def test_mesh_and_attention_pass_through(model_dir, generator):
    mesh = make_mesh(MeshConfig(data=2, tensor=2), devices=jax.devices()[:4])
    sharded = pipeline("text-generation", model=str(model_dir), mesh=mesh, attention="xla", add_bos=True)
    assert sharded.model.attention == "xla"
    kernel = sharded.params["decoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape and not kernel.sharding.is_fully_replicated
    # 3 prompts: the batch gets a spare row so both data-parallel halves have rows
    assert sharded(PROMPTS, max_new_tokens=8) == generator(PROMPTS, max_new_tokens=8)


def test_cli_repetition_penalty_equals_transformers(model_dir, reference, capsys):
    args = ["--model", str(model_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "10", "--add-bos"]
    assert generate_cli.main(args + ["--repetition-penalty", "1.5"]) == 0
    theirs = reference(PROMPTS[0], max_new_tokens=10, do_sample=False, repetition_penalty=1.5)
    assert capsys.readouterr().out == theirs[0]["generated_text"] + "\n"
    assert generate_cli.main(args + ["--repetition-penalty", "0"]) == 2
    assert capsys.readouterr().err == "error: --repetition-penalty must be > 0, got 0.0\n"


def test_hf_loading_arguments_and_return_tensors(model_dir, generator, reference):
    """transformers code that passes torch_dtype, device and return_tensors runs unchanged."""
    import torch

    prompt = "What is the capital of France?"
    halves = pipeline("text-generation", model=str(model_dir), torch_dtype=torch.bfloat16, device=0)
    assert halves.model.dtype == jax.numpy.bfloat16
    assert (
        pipeline("text-generation", model=str(model_dir), torch_dtype="auto").model.dtype == jax.numpy.float32
    )
    with pytest.raises(ValueError, match="differ"):
        pipeline("text-generation", model=str(model_dir), dtype="float32", torch_dtype="bfloat16")
    ours = generator(prompt, max_new_tokens=5, return_tensors=True)
    theirs = reference(prompt, max_new_tokens=5, do_sample=False, return_tensors=True)
    assert list(ours[0]) == ["generated_token_ids"]
    ids = ours[0]["generated_token_ids"]
    text = generator(prompt, max_new_tokens=5)[0]["generated_text"]
    assert generator.tokenizer.decode(ids, skip_special_tokens=True) == text
    # the same continuation as transformers' ids (its prompt ids may differ by the leading </s>)
    assert ids[-5:] == [int(t) for t in theirs[0]["generated_token_ids"]][-5:]
