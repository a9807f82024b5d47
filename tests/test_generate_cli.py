"""`python -m optiml_jax.generate` end to end on a tiny HF model directory with a tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_reference import make_config, make_hf_model

from optiml_jax import generate as gen
from optiml_jax.cli import generate as generate_cli
from optiml_jax.tokenizer import OPTTokenizer

REPO = Path(__file__).resolve().parents[1]


def make_tiny_model_dir(tokenizer_dir, directory) -> Path:
    """A tiny random HF OPT (safetensors) whose vocabulary is the tokenizer's, plus the tokenizer."""
    tokenizer = OPTTokenizer.from_pretrained(tokenizer_dir)
    config = make_config("pre_ln", vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    make_hf_model(config, seed=5).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory):
    return make_tiny_model_dir(tokenizer_dir, tmp_path_factory.mktemp("tiny_opt"))


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # one CPU device is enough, and starts faster
    return subprocess.run(
        [sys.executable, "-m", "optiml_jax.generate", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_prompt_file_is_one_left_padded_batch_with_json_output(model_dir, tmp_path):
    prompts = ["What is the capital of France?", "Translate: café", "Item 7: 37 apples"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    done = _cli(
        "--model", model_dir, "--prompt-file", prompt_file, "--max-new-tokens", 6, "--json", "--add-bos"
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    tokenizer = OPTTokenizer.from_pretrained(model_dir)
    for row in rows:
        assert row["prompt_ids"] == tokenizer.encode(row["prompt"])
        assert 1 <= len(row["token_ids"]) <= 6 and len(row["logprobs"]) == len(row["token_ids"])
        assert all(lp <= 0 for lp in row["logprobs"])
        assert row["completion"] == gen.complete_texts(tokenizer, [row["prompt_ids"]], [row["token_ids"]])[0]

    # the same greedy tokens as the Python API on the same batch
    from optiml_jax.checkpoints.pretrained import load_pretrained

    loaded = load_pretrained(model_dir)
    out = gen.generate(loaded.model, loaded.params, [r["prompt_ids"] for r in rows], max_new_tokens=6)
    assert out.token_ids() == [r["token_ids"] for r in rows]
    np.testing.assert_allclose(
        np.concatenate(out.token_logprobs()), np.concatenate([r["logprobs"] for r in rows]), atol=1e-5
    )


def test_sampling_flags_and_plain_text_output(model_dir):
    args = (
        "--model",
        model_dir,
        "--prompt",
        "Input: What is",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        5,
        "--temperature",
        0.9,
        "--top-k",
        20,
        "--top-p",
        0.95,
        "--seed",
        3,
    )
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # same seed, same text
    lines = first.stdout.splitlines()
    assert len(lines) >= 2 and lines[0].startswith("Input: What is")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "hi"], "--model"),
        (["--model", "{missing}", "--prompt", "hi"], "no such file or directory"),
        (["--model", "{model}", "--prompt-file", "{empty}"], "has no prompts"),
        (["--model", "{model}", "--prompt-file", "{missing}/p.txt"], "cannot read --prompt-file"),
        (["--model", "{model}", "--prompt", "hi", "--prompt-file", "{empty}"], "not both"),
        (["--model", "{model}"], "give a --prompt"),
        (["--model", "{model}", "--prompt", "hi", "--top-k", "5"], "--temperature > 0"),
        (["--model", "{model}", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--model", "{model}", "--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
        (["--model", "{model}", "--prompt", "hi", "--temperature", "1", "--top-p", "2"], "--top-p"),
        (
            ["--model", "{model}", "--prompt", "hi", "--max-new-tokens", "500"],
            "exceeds the model's 128 positions",
        ),
        (["--model", "{model}", "--prompt", ""], "a prompt is empty"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(args, message, model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    args = [a.format(model=model_dir, missing=tmp_path / "nope", empty=empty) for a in args]
    status = generate_cli.main(args)
    err = capsys.readouterr().err
    assert status != 0
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    done = _cli("--model", tmp_path / "nope", "--prompt", "hi")
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("p.txt", "first\n\nsecond\n", ["first", "second"]),
        ("p.txt", "Translate:\ncafé\n---\nSum:\n1 + 2\n---\n", ["Translate:\ncafé", "Sum:\n1 + 2"]),
        ("p.jsonl", '{"prompt": "a\\nb"}\n\n{"prompt": "c"}\n', ["a\nb", "c"]),
    ],
)
def test_prompt_file_forms(name, text, expected):
    from optiml_jax.cli.generate import parse_prompt_file

    assert parse_prompt_file(text, name) == expected


def test_multi_line_prompts_and_separated_text_output(model_dir, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("Instructions: add.\nInput: 1 + 2\n---\nHello\n", encoding="utf-8")
    done = _cli("--model", model_dir, "--prompt-file", prompt_file, "--max-new-tokens", 3)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.split("\n---\n")
    assert first.startswith("Instructions: add.\nInput: 1 + 2") and second.startswith("Hello")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n', encoding="utf-8")
    assert generate_cli.main(["--model", str(model_dir), "--prompt-file", str(bad)]) == 2
