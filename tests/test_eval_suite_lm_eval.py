"""A suite's lm_eval:TASK entry, run offline on a local lm_eval task YAML written here, gives the accuracy
lm_eval itself gives with our `optiml_jax` model loaded from the same directory, with 2 demonstrations
(lm_eval's own prompt and draw; 0-shot agreement of the model itself is tests/test_lm_eval.py's)."""

import json
import os

import jax
import lm_eval  # installed by the README's test command ('.[test]' includes lm_eval[hf])
import pytest
import yaml
from finetune_helpers import TINY_MODEL, TOKENIZER
from lm_eval.tasks import TaskManager

import optiml_jax.lm_eval  # noqa: F401  (registers the optiml_jax model)
from optiml_jax.checkpoints.model_format import save_model
from optiml_jax.config import OPTConfig
from optiml_jax.eval.suite import load_suite
from optiml_jax.eval.suite_run import SuiteSettings, run_suite
from optiml_jax.model import OPTForCausalLM
from optiml_jax.sharding import MeshConfig, init_params_sharded, make_mesh
from optiml_jax.tokenizer import OPTTokenizer

QUESTIONS = [
    ("What color is the sky on a clear day?", ["blue", "green", "red"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten"], 1),
    ("Which is the capital of France?", ["Berlin", "Madrid", "Paris"], 2),
    ("What do bees make?", ["honey", "milk", "silk"], 0),
    ("Which animal barks?", ["cat", "dog", "cow"], 1),
    ("What is frozen water?", ["steam", "sand", "ice"], 2),
]
TASK_YAML = {
    "task": "suite_local_mc",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"train": "mc.jsonl", "test": "mc.jsonl"}},
    "training_split": "train",
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{label}}",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}


def test_lm_eval_entry_matches_lm_eval_run_directly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    with (tasks / "mc.jsonl").open("w") as f:
        for question, choices, label in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "label": label}) + "\n")
    (tasks / "suite_local_mc.yaml").write_text(yaml.safe_dump(TASK_YAML))
    entry = dict(
        task="local_mc",
        data="lm_eval:suite_local_mc",
        benchmark="opt14",
        category="question_answering",
        level="partially_supervised",
        metric="accuracy",
        mode="rank",
        shots=[2],
    )
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"lm_eval_include": "tasks", "entries": [entry]}))

    config = OPTConfig(**{**TINY_MODEL, "dropout": 0.0})
    model = OPTForCausalLM(config, scan_layers=jax.default_backend() != "cpu")
    mesh = make_mesh(MeshConfig())
    params, _ = init_params_sharded(model, jax.random.PRNGKey(4), mesh)
    tokenizer = OPTTokenizer.from_pretrained(TOKENIZER)
    save_model(tmp_path / "model", config, params, tokenizer)

    suite = load_suite(tmp_path / "suite.yaml")
    ours = run_suite(model, params, tokenizer, suite, None, SuiteSettings(batch_size=8), mesh=mesh)
    assert {r["shots"] for r in ours.records} == {2} and len(ours.records) == len(QUESTIONS)
    cwd = os.getcwd()
    os.chdir(tasks)
    try:
        direct = lm_eval.simple_evaluate(
            model="optiml_jax",
            model_args=f"pretrained={tmp_path / 'model'},dtype=float32",
            tasks=["suite_local_mc"],
            num_fewshot=2,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            batch_size=8,
            random_seed=0,
            fewshot_random_seed=0,
            log_samples=True,
        )
        accuracy = 100 * direct["results"]["suite_local_mc"]["acc,none"]
        assert ours.metrics["per_task"]["local_mc"]["2"] == pytest.approx(accuracy, abs=1e-3)
        # the same prompts, demonstrations included: the records are lm_eval's samples one for one
        theirs = {s["doc_id"]: 100.0 * s["acc"] for s in direct["samples"]["suite_local_mc"]}
        assert {int(r["id"].split(":")[1]): r["acc"] for r in ours.records} == theirs
    finally:
        os.chdir(cwd)
