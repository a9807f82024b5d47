"""Generation evaluation end to end: bucketed, sharded greedy answers equal Hugging Face `generate` on each
prompt alone; the CLI writes predictions / metrics / report that re-scoring reproduces; bad input is one
line and leaves no output behind, a disk that fills is a runtime failure."""

import errno
import json

import jax
import numpy as np
import pytest
import torch
from finetune_helpers import SNI, SNI_TRAIN_SPLIT, TOKENIZER
from hf_reference import make_hf_model
from tiny_models import tiny_model_settings

from optiml_jax.cli.evaluate import main
from optiml_jax.config import OPTConfig
from optiml_jax.eval.generation import generate_completions, prompt_buckets
from optiml_jax.sharding import MeshConfig, make_mesh
from optiml_jax.tokenizer import OPTTokenizer

# The demo tokenizer's vocabulary; 64 positions, so SNI prompts must be cut to fit.
MODEL = tiny_model_settings()


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A random tiny OPT in Hugging Face layout with the demo tokenizer: the model every test here uses."""
    directory = tmp_path_factory.mktemp("eval_model")
    model = make_hf_model(OPTConfig(**MODEL), seed=3)
    model.save_pretrained(directory)
    OPTTokenizer.from_pretrained(TOKENIZER).save_pretrained(directory)
    return directory, model


def hf_greedy_text(hf, tokenizer, ids, max_new_tokens, stop=()):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=1,
        )
    new = [t for t in out[0, len(ids) :].tolist() if t != 2]
    text = tokenizer.decode(ids + new)[len(tokenizer.decode(ids)) :]
    for s in stop:
        text = text.split(s)[0]
    return text.strip()


def test_bucketed_sharded_generation_equals_hf_generate_per_prompt(hf_model_dir):
    from optiml_jax import load_pretrained
    from optiml_jax.generate import _generate_compiled

    directory, hf = hf_model_dir
    mesh = make_mesh(MeshConfig(data=4), devices=jax.devices()[:4])
    loaded = load_pretrained(directory, scan_layers=False, mesh=mesh)
    tokenizer = loaded.tokenizer
    texts = [
        "Hi",
        "What is the capital of France?",
        "Input: 3 apples and 4 pears\nOutput:",
        json.loads((SNI / "task1146_country_capital.json").read_text())["Definition"][0] * 3,  # cut to fit
        "Item 7: 259 apples, 77 pears (0 left).",
        "a",
        "The quick brown fox jumps over the lazy dog. " * 2,
    ]
    prompts = [tokenizer.encode(t, add_bos=False) for t in texts]
    max_new = 8
    before = _generate_compiled._cache_size()
    got, truncated, stats = generate_completions(
        loaded.model, loaded.params, tokenizer, prompts, max_new_tokens=max_new, batch_size=4, mesh=mesh
    )
    room = MODEL["max_position_embeddings"] - max_new
    assert truncated == [len(p) > room for p in prompts] and sum(truncated) >= 1
    want = [hf_greedy_text(hf, tokenizer, p[-room:], max_new) for p in prompts]
    assert got == want and sum(bool(t) for t in want) >= 5  # answers, not empty strings
    # 7 prompts in batches of 4 (the last padded with dummies); one program per prompt bucket used
    assert stats.batches == 2 and stats.programs <= len(prompt_buckets(room))
    assert _generate_compiled._cache_size() - before == stats.programs
    # stop strings cut the answer exactly where the text first holds one (and may end the loop early)
    stop = next(t[1] for t in want if len(t) > 2)
    got_stopped, _, _ = generate_completions(
        loaded.model,
        loaded.params,
        tokenizer,
        prompts,
        max_new_tokens=max_new,
        batch_size=4,
        mesh=mesh,
        stop=[stop],
    )
    assert got_stopped == [hf_greedy_text(hf, tokenizer, p[-room:], max_new, stop=[stop]) for p in prompts]
    with pytest.raises(ValueError, match="not a positive multiple of the mesh's data-parallel devices"):
        generate_completions(
            loaded.model, loaded.params, tokenizer, prompts, max_new_tokens=4, batch_size=6, mesh=mesh
        )


def run_cli(capsys, *args):
    code = main([*map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli_on_sni(capsys, directory, split, *args):
    """run_cli with the model in `directory` on the shipped SNI sample's tasks listed in `split`."""
    return run_cli(capsys, "--model", directory, "--data", SNI, "--split", split, *args)


def test_cli_writes_predictions_metrics_and_report_that_rescoring_reproduces(hf_model_dir, tmp_path, capsys):
    directory, _ = hf_model_dir
    out = tmp_path / "eval"
    split = tmp_path / "split.txt"
    split.write_text("task833_poem_sentiment_classification\ntask1146_country_capital\n")
    code, stdout, err = run_cli_on_sni(
        capsys,
        directory,
        split,
        "--max-instances",
        3,
        "--max-new-tokens",
        4,
        "--template",
        "tk_instruct",
        "--shots",
        1,
        "--stop",
        "\\n",
        "--mesh",
        "data=-1",
        "--batch-size",
        8,
        "--output",
        out,
    )
    assert code == 0, err
    assert "overall" in stdout and "task1146_country_capital" in stdout
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    first_ids = [
        i["id"] for i in json.loads((SNI / "task1146_country_capital.json").read_text())["Instances"][:3]
    ]
    assert [(r["task"], r["id"]) for r in records[:3]] == [("task1146_country_capital", i) for i in first_ids]
    assert len(records) == 6 and {
        "task",
        "id",
        "category",
        "prompt",
        "prediction",
        "references",
        "exact_match",
        "rouge1",
        "rougeL",
    } <= set(records[0])
    assert (
        records[0]["prompt"].startswith("Definition: ") and " Positive Example 1 -\n" in records[0]["prompt"]
    )
    assert all("\n" not in r["prediction"] for r in records)  # cut at the stop string
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"overall", "per_category", "per_task", "settings"}
    assert metrics["overall"]["instances"] == 6
    assert metrics["per_category"]["sentiment_analysis"]["primary_metric"] == "rougeL"
    assert metrics["settings"]["template"] == "tk_instruct" and metrics["settings"]["shots"] == 1
    assert metrics["settings"]["generation"]["prompts"] == 6
    assert "| task833_poem_sentiment_classification |" in (out / "report.md").read_text()

    # Another system's predictions, scored by the same code: hand-made answers give known scores
    for r in records:
        r["prediction"] = (
            r["references"][0] if r["task"] == "task833_poem_sentiment_classification" else "wrong"
        )
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, stdout, err = run_cli(capsys, "--predictions", theirs, "--output", tmp_path / "rescored")
    assert code == 0, err
    rescored = json.loads((tmp_path / "rescored" / "metrics.json").read_text())
    assert rescored["per_task"]["task833_poem_sentiment_classification"]["exact_match"] == 100.0
    assert rescored["per_task"]["task1146_country_capital"]["exact_match"] == 0.0
    assert rescored["overall"]["exact_match"] == 50.0
    # re-scoring our own file gives our metrics back
    code, _, err = run_cli(capsys, "--predictions", out / "predictions.jsonl", "--output", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert code == 0 and {k: again[k] for k in ("overall", "per_task", "per_category")} == {
        k: metrics[k] for k in ("overall", "per_task", "per_category")
    }


@pytest.mark.parametrize(
    "problem", ["existing_output", "no_task_in_split", "no_model", "no_references", "bad_mesh"]
)
def test_cli_bad_input_is_one_line_and_writes_nothing(hf_model_dir, tmp_path, capsys, problem):
    directory, _ = hf_model_dir
    out = tmp_path / "out"
    args = ["--model", directory, "--data", SNI, "--max-instances", 1, "--max-new-tokens", 2, "--output", out]
    expected = {
        "existing_output": "exists and is not empty",
        "no_task_in_split": "none of the 10 task files",
        "no_model": "no such file or directory",
        "no_references": "#t-1: 'output' must be a non-empty list",
        "bad_mesh": "--mesh",
    }[problem]
    if problem == "existing_output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif problem == "no_task_in_split":
        (tmp_path / "split.txt").write_text("task000_nothing\n")
        args += ["--split", tmp_path / "split.txt"]
    elif problem == "no_model":
        args[1] = tmp_path / "missing"
    elif problem == "no_references":
        task = json.loads((SNI / "task1146_country_capital.json").read_text())
        task["Instances"] = [{"id": "t-1", "input": "x", "output": []}]
        (tmp_path / "task1_bad.json").write_text(json.dumps(task))
        args[3] = tmp_path / "task1_bad.json"
    else:
        args += ["--mesh", "data=3"]
    code, stdout, err = run_cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    if problem == "existing_output":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp*"))


def test_cli_a_full_disk_is_a_runtime_failure_and_a_missing_file_bad_input(tmp_path, capsys, monkeypatch):
    predictions = tmp_path / "predictions.jsonl"
    record = {"task": "t", "id": "t-0", "prediction": "a", "references": ["a"]}
    predictions.write_text(json.dumps(record) + "\n")
    code, _, err = run_cli(capsys, "--predictions", tmp_path / "missing.jsonl", "--output", tmp_path / "a")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err

    def full_disk(directory, result, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr("optiml_jax.cli.evaluate.write_results", full_disk)
    code, _, err = run_cli(capsys, "--predictions", predictions, "--output", tmp_path / "b")
    assert code == 1 and "Traceback" not in err, err
    line = f"error: [Errno {errno.ENOSPC}] No space left on device: '{tmp_path / 'b'}'"
    assert err.strip().splitlines() == [line]


def test_rank_classification_of_jsonl_options_and_sni_label_sets(hf_model_dir, tmp_path, capsys):
    from optiml_jax.eval.scoring import encode_pair

    directory, hf = hf_model_dir
    tokenizer = OPTTokenizer.from_pretrained(directory)
    data = tmp_path / "mc.jsonl"
    rows = [
        {"src": "Sky color?\nAnswer:", "options": ["blue", "green", "red"], "tgt": "blue"},
        {"src": "Bees make\nAnswer:", "options": ["milk", "honey"], "label": 1},
        {"src": "2 + 2 =", "options": ["3", "4", "22", "five"], "references": ["4"]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, stdout, err = run_cli(
        capsys,
        "--model",
        directory,
        "--data",
        data,
        "--output",
        tmp_path / "mc",
        "--batch-size",
        2,
        "--mesh",
        "data=2,tensor=4",
    )
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "mc" / "predictions.jsonl").read_text().splitlines()]
    for row, record in zip(rows, records):
        # independently: HF log-probabilities of " " + option after the prompt (no BOS, as the CLI's default)
        logprobs = []
        for option in row["options"]:
            context, continuation = encode_pair(tokenizer, row["src"], " " + option, add_bos=False)
            with torch.no_grad():
                lp = torch.log_softmax(
                    hf(input_ids=torch.tensor([context + continuation[:-1]])).logits.float(), -1
                )[0]
            n = len(continuation)
            logprobs.append(float(lp[-n:].gather(-1, torch.tensor(continuation)[:, None]).sum()))
        assert record["option_logprobs"] == pytest.approx(logprobs, abs=1e-4)
        best = row["options"][int(np.argmax(logprobs))]
        best_norm = row["options"][int(np.argmax([lp / len(o) for lp, o in zip(logprobs, row["options"])]))]
        assert record["prediction"] == best and record["prediction_norm"] == best_norm
        assert record["acc"] == 100.0 * (best in record["references"])
        assert record["acc_norm"] == 100.0 * (best_norm in record["references"])
    assert records[1]["references"] == ["honey"]
    metrics = json.loads((tmp_path / "mc" / "metrics.json").read_text())
    assert metrics["overall"]["acc"] == pytest.approx(np.mean([r["acc"] for r in records]), abs=1e-4)
    assert (
        metrics["per_category"]["uncategorized"]["primary_metric"] == "acc"
        and "exact_match" not in metrics["overall"]
    )
    assert "acc" in stdout

    # SNI tasks ranked over their distinct outputs; those with more than --max-options are skipped
    code, _, err = run_cli_on_sni(
        capsys,
        directory,
        SNI_TRAIN_SPLIT,
        "--mode",
        "rank",
        "--max-options",
        6,
        "--max-instances",
        2,
        "--output",
        tmp_path / "rank",
        "--batch-size",
        4,
        "--mesh",
        "data=4,tensor=2",
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "rank" / "metrics.json").read_text())
    assert set(metrics["per_task"]) == {
        "task833_poem_sentiment_classification",
        "task1135_xcsr_en_commonsense_mc_classification",
        "task1418_bless_semantic_relation_classification",
    }
    assert len(metrics["settings"]["skipped_tasks"]) == 5 and "skipping" not in err
    records = [
        json.loads(line) for line in (tmp_path / "rank" / "predictions.jsonl").read_text().splitlines()
    ]
    assert {frozenset(r["options"]) for r in records if r["task"].startswith("task833")} == {
        frozenset({"negative", "positive"})
    }
    # re-scoring a ranked file recomputes accuracy from the stored log-probabilities
    code, _, err = run_cli(
        capsys, "--predictions", tmp_path / "rank" / "predictions.jsonl", "--output", tmp_path / "re"
    )
    again = json.loads((tmp_path / "re" / "metrics.json").read_text())
    assert code == 0 and again["overall"] == metrics["overall"]


@pytest.mark.parametrize(
    "extra", [["--shots", "2"], ["--max-new-tokens", "8"], ["--add-bos"], ["--model", "m"]]
)
def test_cli_rescoring_refuses_flags_it_would_ignore(tmp_path, capsys, extra):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(
        json.dumps({"task": "t", "id": "t-0", "prediction": "a", "references": ["a"]}) + "\n"
    )
    code, _, err = run_cli(capsys, "--predictions", predictions, "--output", tmp_path / "out", *extra)
    assert code == 2 and err.strip().splitlines() == [
        f"error: --predictions re-scores a file; {extra[0]} would be unused"
    ]
    assert not (tmp_path / "out").exists()
