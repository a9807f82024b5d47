"""One prompt convention (docs/evaluation.md, "Prompt convention"): fine-tuning, evaluation, pipeline()
and optiml-generate encode a prompt the same way by default, so a pipeline answers what evaluation
scored; add_bos=True gives transformers' tokenization."""

import json

import pytest
from finetune_helpers import read_jsonl

from optiml_jax import pipeline
from optiml_jax.cli import generate as gen
from optiml_jax.data import Example, tokenize_examples
from optiml_jax.eval.runner import EvalSettings
from optiml_jax.evaluate import parse_args
from optiml_jax.finetune import main as finetune
from optiml_jax.tokenizer import DEMO_TOKENIZER_DIR, PROMPT_ADD_BOS, OPTTokenizer

MAX_NEW_TOKENS = 16  # the demo's eval.tasks.max_new_tokens


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo (configs/demo.yaml: tiny model, SNI sample, 160 held-out instances), trained briefly:
    enough for answers that depend on the prompt's every token."""
    workdir = tmp_path_factory.mktemp("demo_run")
    code = finetune(
        [
            "--config",
            "demo",
            f"workdir={workdir}",
            "train.max_steps=100",
            "eval.every_steps=0",
            "checkpoint.every_steps=0",
            "--no-progress",
        ]
    )
    assert code == 0
    final_eval = max((workdir / "eval").iterdir(), key=lambda p: int(p.name))
    return workdir, read_jsonl(final_eval / "predictions.jsonl")


def test_the_convention_is_metaseqs_fine_tuning_data_everywhere():
    assert PROMPT_ADD_BOS is False
    assert EvalSettings().add_bos is PROMPT_ADD_BOS
    assert parse_args(["--model", "m", "--data", "d", "--output", "x"]).add_bos is PROMPT_ADD_BOS
    assert parse_args(["--model", "m", "--data", "d", "--output", "x", "--add-bos"]).add_bos is True
    tokenizer = OPTTokenizer.from_pretrained(DEMO_TOKENIZER_DIR)
    (example,) = tokenize_examples(
        [Example(task="t", src="Input: x. Output:", tgt="y", source="t")], tokenizer
    )
    assert example.tokens[: example.num_source] == tuple(tokenizer.encode("Input: x. Output:", add_bos=False))


@pytest.mark.slow
def test_pipeline_answers_equal_evaluation_answers_on_the_demo_held_out_instances(demo_run):
    workdir, records = demo_run
    assert len(records) == 160
    assert sum(1 for r in records if r["prediction"]) > 80  # real answers (the label words), not all EOS
    prompts = [r["prompt"] for r in records]
    generator = pipeline("text-generation", model=str(workdir / "final"), batch_size=32)
    answers = generator(prompts, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert [a[0]["generated_text"].strip() for a in answers] == [r["prediction"] for r in records]
    # the switch is real: with </s> first (transformers' tokenization) answers change
    hf_style = pipeline("text-generation", model=str(workdir / "final"), batch_size=32, add_bos=True)
    with_bos = hf_style(prompts, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert [a[0]["generated_text"].strip() for a in with_bos] != [r["prediction"] for r in records]


@pytest.mark.slow
def test_generate_cli_encodes_as_evaluation_unless_add_bos(demo_run, capsys):
    workdir, records = demo_run
    tokenizer = OPTTokenizer.from_pretrained(workdir / "final")
    record = records[0]
    base = ["--model", str(workdir / "final"), "--prompt", record["prompt"], "--json"]
    assert gen.main([*base, "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["prompt_ids"] == tokenizer.encode(record["prompt"], add_bos=False)
    assert row["completion"].strip() == record["prediction"]
    assert gen.main([*base, "--max-new-tokens", "2", "--add-bos"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_ids"] == tokenizer.encode(record["prompt"])


def test_data_add_bos_is_the_training_side_switch(tmp_path):
    """data.add_bos=true packs `</s>` before every source, as transformers' tokenizer encodes a prompt;
    in-training evaluation follows it (its settings come from the run's data section)."""
    from optiml_jax.data import DataConfig
    from optiml_jax.eval.runner import settings_from_config
    from optiml_jax.run_config import RunConfig, load_run_config

    tokenizer = OPTTokenizer.from_pretrained(DEMO_TOKENIZER_DIR)
    src = "Input: x. Output:"
    example = Example(task="t", src=src, tgt="y", source="t")
    (with_bos,) = tokenize_examples([example], tokenizer, add_bos=True)
    assert with_bos.tokens[: with_bos.num_source] == tuple(tokenizer.encode(src))  # </s> first
    assert with_bos.tokens[0] == tokenizer.bos_id
    cfg = load_run_config("demo", ["data.add_bos=true"])
    assert isinstance(cfg, RunConfig) and cfg.data.add_bos is True
    assert settings_from_config(cfg.eval.tasks, 8, cfg.data.add_bos).add_bos is True
    with pytest.raises(Exception, match="data.add_bos must be true or false"):
        DataConfig(add_bos="yes")
