"""Suites (optiml_jax/eval/suite*.py): a small suite of SNI sample tasks and generated multi-template records
run on a tiny random model; the figures of metrics.json recomputed here independently from
predictions.jsonl (template mean, task, category over benchmarks, level, selection score), k-shot
placement for task- and instance-level instructions, left truncation of demonstrations, and bad entries
as one error line each."""

import json
from pathlib import Path
from statistics import fmean
from types import SimpleNamespace

import jax
import pytest
import yaml
from finetune_helpers import SNI, TINY_MODEL, TOKENIZER

from optiml_jax.checkpoints.model_format import save_model
from optiml_jax.cli.evaluate import main
from optiml_jax.config import OPTConfig
from optiml_jax.eval.aggregate import aggregate_suite
from optiml_jax.eval.shots import INSTANCE_SEPARATOR
from optiml_jax.eval.suite import SuiteError, load_suite
from optiml_jax.eval.suite_report import suite_report
from optiml_jax.eval.suite_run import SuiteSettings, run_suite
from optiml_jax.model import OPTForCausalLM
from optiml_jax.sharding import MeshConfig, init_params_sharded, make_mesh
from optiml_jax.tokenizer import OPTTokenizer

MODEL = {**TINY_MODEL, "dropout": 0.0}  # 128 positions: 5-shot prompts overflow, as the tests need
SETTINGS = SuiteSettings(max_new_tokens=4, batch_size=8)


@pytest.fixture(scope="module")
def tiny():
    config = OPTConfig(**MODEL)
    model = OPTForCausalLM(config, scan_layers=False)
    params, _ = init_params_sharded(model, jax.random.PRNGKey(0), make_mesh(MeshConfig(data=-1)))
    return model, params, OPTTokenizer.from_pretrained(TOKENIZER)


def write_records(path: Path, task: str, templates: list[str], n: int, ranked: bool) -> Path:
    """n instances of `task` under each template (its own wording), ranked over yes/no or generated."""
    with path.open("w") as f:
        for template in templates:
            for i in range(n):
                record = {"task": task, "template": template, "src": f"[{template}] item {i} of {task}?"}
                if ranked:
                    record.update(options=["yes", "no"], label=i % 2)
                else:
                    record["tgt"] = f"answer {i}"
                f.write(json.dumps(record) + "\n")
    return path


def suite_file(tmp: Path, entries: list, **settings) -> Path:
    path = tmp / "suite.yaml"
    path.write_text(yaml.safe_dump({"entries": entries, **settings}))
    return path


ENTRY_KEYS = ("task", "data", "benchmark", "category", "level", "metric", "mode")


def entry(task, data, benchmark, category, level, metric="rougeL", mode="generate", shots=(0, 5), **extra):
    values = (task, str(data), benchmark, category, level, metric, mode)
    return {**dict(zip(ENTRY_KEYS, values)), "shots": list(shots), **extra}


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("suite")
    nli = write_records(tmp / "nli.jsonl", "nli", ["t1", "t2", "t3"], 6, ranked=True)
    qa = write_records(tmp / "qa.jsonl", "qa", ["q1", "q2"], 6, ranked=False)
    entries = [
        entry("nli", nli, "flan", "textual_entailment", "fully_held_out", "accuracy", "rank"),
        entry(
            "capital", SNI / "task1146_country_capital.json", "sni", "textual_entailment", "fully_held_out"
        ),
        entry("qa", qa, "promptsource", "question_answering", "partially_supervised", "exact_match"),
        entry(
            "summaries",
            SNI / "task1508_wordnet_antonyms.json",
            "sni",
            "summarization",
            "fully_supervised",
            shots=[0],
        ),
        entry(
            "poem",
            SNI / "task833_poem_sentiment_classification.json",
            "sni",
            "sentiment_analysis",
            "fully_supervised",
            "accuracy",
            "rank",
            shots=[0, 2],
            templates=["optiml", "tk_instruct"],
        ),
    ]
    path = suite_file(tmp, entries, max_instances=4, seed=3)
    model, params, tokenizer = tiny
    save_model(tmp / "model", model.config, params, tokenizer)
    argv = ["--model", str(tmp / "model"), "--suite", str(path), "--output", str(tmp / "out")]
    assert main([*argv, "--max-new-tokens", "4", "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp / "out" / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    return records, metrics, tmp / "out"


def test_figures_recomputed_from_predictions(small_suite):
    records, metrics, _ = small_suite
    for record in records:
        for key in ("task", "template", "shots", "level", "category", "benchmark"):
            assert key in record
    value = {"accuracy": "acc", "rougeL": "rougeL", "exact_match": "exact_match"}
    by_template = {}
    for r in records:
        by_template.setdefault((r["task"], r["shots"], r["template"]), []).append(r[value[r["metric"]]])
    assert {t for (task, _, t) in by_template if task == "nli"} == {"t1", "t2", "t3"}
    task_score, info = {}, {r["task"]: r for r in records}
    for (task, shots, _), values in by_template.items():
        task_score.setdefault((task, shots), []).append(fmean(values))
    task_score = {key: fmean(v) for key, v in task_score.items()}  # the mean over templates
    for (task, shots), score in task_score.items():
        assert metrics["per_task"][task][str(shots)] == pytest.approx(score, abs=1e-3)
    groups = {}  # (level, category) -> shots -> benchmark -> task scores
    for (task, shots), score in task_score.items():
        i = info[task]
        groups.setdefault((i["level"], i["category"]), {}).setdefault(shots, {}).setdefault(
            i["benchmark"], []
        ).append(score)
    group_score = {
        g: {s: fmean(fmean(t) for t in b.values()) for s, b in by_shot.items()}
        for g, by_shot in groups.items()
    }
    # textual entailment mixes accuracy (flan) and ROUGE-L (sni): the mean over the two benchmarks
    te = group_score[("fully_held_out", "textual_entailment")]
    assert te[5] == pytest.approx(fmean([task_score[("nli", 5)], task_score[("capital", 5)]]))
    for (level, category), by_shot in group_score.items():
        for shots, score in by_shot.items():
            assert metrics["per_level_category"][level][category][str(shots)] == pytest.approx(
                score, abs=1e-3
            )
    for level in ("fully_held_out", "partially_supervised", "fully_supervised"):
        for shots in (0, 5):
            scores = [v[shots] for (lv, _), v in group_score.items() if lv == level and shots in v]
            if scores:
                assert metrics["per_level"][level][str(shots)] == pytest.approx(fmean(scores), abs=1e-3)
    benchmarks = {}
    for (task, shots), score in task_score.items():
        benchmarks.setdefault(info[task]["benchmark"], {}).setdefault(shots, []).append(score)
    for name, by_shot in benchmarks.items():
        for shots, scores in by_shot.items():
            assert metrics["per_benchmark"][name][str(shots)] == pytest.approx(fmean(scores), abs=1e-3)
    selection = []
    for (_, category), by_shot in group_score.items():
        wanted = (0,) if category == "summarization" else (0, 5)
        present = [by_shot[k] for k in wanted if k in by_shot]
        selection.append(fmean(present))
    assert metrics["selection_score"] == pytest.approx(fmean(selection), abs=1e-3)
    assert metrics["run"]["compilations"] > 0


def test_report_is_table_16_shaped(small_suite):
    report = (small_suite[2] / "report.md").read_text()
    assert "| **fully held-out** |" in report and "| | textual_entailment |" in report
    assert "0-shot / 2-shot / 5-shot" in report
    assert "Selection score:" in report
    assert "Beside the paper" not in report  # a tiny model has no released size


def test_k_shot_placement_task_and_instance_level(small_suite):
    records, _, _ = small_suite
    task = json.loads((SNI / "task1146_country_capital.json").read_text())
    definition = task["Definition"][0].strip()
    capital = [r for r in records if r["task"] == "capital" and r["shots"] == 5]
    demos_by_prompt = set()
    for r in capital:
        assert r["prompt"].startswith(f"Instructions: {definition}\n\nInput: ")  # demonstrations after it
        blocks = r["prompt"].split("\n\n")
        assert blocks[-1].startswith("Input: ") and blocks[-1].endswith("\nOutput:")
        assert 1 + 1 + 1 <= len(blocks) <= 1 + 5 + 1  # 128 positions: the first demonstrations may go
        assert all(demo.startswith("Input: ") and "\nOutput: " in demo for demo in blocks[1:-1])
        demos_by_prompt.add(tuple(blocks[1:-1]))
        instance_input = blocks[-1][len("Input: ") :].rsplit("\nOutput:", 1)[0]
        assert all(instance_input not in demo for demo in blocks[1:-1])
    # task-level: one fixed set of demonstrations per task (less its first ones where a prompt overflows)
    longest = max(demos_by_prompt, key=len)
    assert all(longest[len(longest) - len(demos) :] == demos for demos in demos_by_prompt)
    poem = json.loads((SNI / "task833_poem_sentiment_classification.json").read_text())
    positives = [
        f"Input: {p['input'].strip()}\nOutput: {p['output'].strip()}" for p in poem["Positive Examples"]
    ]
    two_shot = [r for r in records if r["task"] == "poem" and r["shots"] == 2 and r["template"] == "optiml"]
    assert two_shot
    for r in two_shot:  # k <= positives: exactly them, in file order, the first dropped on overflow
        kept = r["demonstrations"]
        assert r["prompt"].split("\n\n")[1 : 1 + kept] == positives[2 - kept :]
    qa = [r for r in records if r["task"] == "qa" and r["shots"] == 5]
    for r in qa:
        parts = r["prompt"].split(INSTANCE_SEPARATOR)
        assert len(parts) == 6
        assert parts[-1].startswith(
            f"[{r['template']}] item {r['id'] - 1 - (0 if r['template'] == 'q1' else 6)} of qa?"
        )
        for demo in parts[:-1]:  # before the example, drawn from the same template, never the instance
            assert demo.startswith(f"[{r['template']}]") and demo != parts[-1]
            assert demo.split("?")[0] + "?" != parts[-1]


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory, tiny):
    """run_suite in-process: a task of long records at 5 shots, and a pattern entry over three tasks."""
    model, params, tokenizer = tiny
    tmp = tmp_path_factory.mktemp("direct")
    long = tmp / "long.jsonl"
    with long.open("w") as f:
        for i in range(8):
            words = " ".join(f"w{i}x{j}" for j in range(12))
            f.write(json.dumps({"task": "long", "src": f"Q{i}: {words}?", "tgt": f"a{i}"}) + "\n")
    mixed = tmp / "mixed.jsonl"
    with mixed.open("w") as f:
        for task, category in (
            ("nli_a", "textual_entailment"),
            ("nli_b", "textual_entailment"),
            ("qa_c", "qa"),
        ):
            for i in range(2):
                f.write(
                    json.dumps({"task": task, "category": category, "src": f"{task} {i}?", "tgt": "x"}) + "\n"
                )
    entries = [
        entry("long", long, "flan", "qa", "fully_supervised", shots=[5]),
        entry("nli_*", mixed, "flan", "textual_entailment", "fully_held_out", shots=[0]),
    ]
    settings = SuiteSettings(max_new_tokens=32, batch_size=8)
    result = run_suite(
        model, params, tokenizer, load_suite(suite_file(tmp, entries, max_instances=3)), None, settings
    )
    return result, settings


def test_left_truncation_drops_the_first_demonstrations(direct_run, tiny):
    result, settings = direct_run
    tokenizer = tiny[2]
    room = MODEL["max_position_embeddings"] - settings.max_new_tokens
    assert result.metrics["run"]["dropped_demonstrations"] > 0
    assert result.metrics["run"]["truncated_prompts"] == 0  # demonstrations went first, not the instance
    long = [r for r in result.records if r["task"] == "long"]
    assert len(long) == 3
    for record in long:
        assert len(tokenizer.encode(record["prompt"], add_bos=False)) <= room
        parts = record["prompt"].split(INSTANCE_SEPARATOR)
        assert parts[-1].startswith(f"Q{record['id'] - 1}:")
        assert 1 <= len(parts) < 6 and len(parts) - 1 == record["demonstrations"]
    dropped = sum(5 - r["demonstrations"] for r in long)
    assert result.metrics["run"]["dropped_demonstrations"] == dropped


def test_task_pattern_expands_to_the_category_tasks(direct_run):
    metrics = direct_run[0].metrics
    assert {"nli_a", "nli_b"} <= set(metrics["per_task"]) and "qa_c" not in metrics["per_task"]
    assert metrics["tasks"]["nli_b"]["category"] == "textual_entailment"


def test_report_puts_the_paper_beside_a_released_size():
    records = [
        dict(
            task=t,
            template="t",
            shots=k,
            level="fully_held_out",
            category="nli",
            benchmark=b,
            metric="accuracy",
            acc=a,
        )
        for t, b in (("anli", "flan"), ("cb", "promptsource"))
        for k, a in ((0, 50.0), (5, 100.0))
    ]
    metrics = {**aggregate_suite(records), "run": {"compilations": 1}}
    config_30b = SimpleNamespace(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56)
    report = suite_report(metrics, config_30b, "test")
    assert "## Beside the paper (30b models)" in report
    assert "| flan | this model | 0: 50.0, 5: 100.0 |" in report
    assert (
        "| flan | OPT-IML-30B | 0: 60.9, 5: 58.3 |" in report
        and "| promptsource | OPT-30B | 0: 39.8, 5: 37.9 |" in report
    )
    assert metrics["selection_score"] == pytest.approx(75.0)


def test_bad_entries_are_one_line_each(tmp_path):
    path = suite_file(
        tmp_path,
        [
            entry("ok", SNI / "task1146_country_capital.json", "sni", "qa", "fully_supervised"),
            entry("a", SNI / "task1146_country_capital.json", "sni", "qa", "held_out"),
            {**entry("b", tmp_path / "missing.jsonl", "sni", "qa", "fully_supervised"), "metric": "bleu"},
            {"task": "c"},
            entry("ok", SNI / "task1146_country_capital.json", "sni", "qa", "fully_supervised", shots=[-1]),
        ],
    )
    with pytest.raises(SuiteError) as error:
        load_suite(path)
    lines = str(error.value).splitlines()
    assert (
        lines[0] == f"{path}: entry 1 (a): 'level' must be one of fully_held_out, partially_supervised, "
        "fully_supervised, got 'held_out'"
    )
    assert any(line.startswith(f"{path}: entry 2 (b): 'metric' must be one of") for line in lines)
    assert any(
        line == f"{path}: entry 2 (b): 'data' {str(tmp_path / 'missing.jsonl')!r}: no such file or directory"
        for line in lines
    )
    assert f"{path}: entry 3 (c): missing key 'data'" in lines
    assert any(line.startswith(f"{path}: entry 4 (ok): 'shots' must be") for line in lines)
    assert all(line.startswith(f"{path}: entry ") for line in lines)


def test_cli_prints_every_bad_entry_and_exits_2(tmp_path, capsys):
    path = suite_file(
        tmp_path,
        [
            entry("a", SNI / "task1146_country_capital.json", "sni", "qa", "fully_supervised", mode="guess"),
            entry(
                "b", SNI / "task1146_country_capital.json", "sni", "qa", "fully_supervised", templates="some"
            ),
        ],
    )
    code = main(["--model", str(tmp_path / "none"), "--suite", str(path), "--output", str(tmp_path / "out")])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"error: {path}: entry ") for line in lines)
    assert "'mode' must be one of generate, rank, got 'guess'" in lines[0] and "(b): 'templates'" in lines[1]
    assert not (tmp_path / "out").exists()
