"""eval.suite in fine-tuning: the selection score and per-level figures at every evaluation step in
metrics.jsonl, and best/, the model of the best step so far (its marker names the step; the same suite
on best/ gives that step's score), exportable to Hugging Face's layout."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from finetune_helpers import SNI, run_config

from optiml_jax.checkpoints.export import export_hf
from optiml_jax.checkpoints.model_format import FORMAT_NAME, FORMAT_VERSION, MARKER, read_marker
from optiml_jax.checkpoints.pretrained import load_pretrained
from optiml_jax.eval.suite import load_suite
from optiml_jax.eval.suite_run import SuiteSettings, run_suite
from optiml_jax.tokenizer import PROMPT_ADD_BOS
from optiml_jax.train import suite_hook as suite_hook_module
from optiml_jax.train import train_and_evaluate
from optiml_jax.train.metrics_log import read_jsonl


@pytest.fixture(scope="module")
def suite_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft_suite")
    with (tmp / "yes_no.jsonl").open("w") as f:
        for i in range(6):
            f.write(
                json.dumps({"task": "yn", "src": f"Is {i} even?", "options": ["yes", "no"], "label": i % 2})
                + "\n"
            )
    entries = [
        dict(task="yn", data="yes_no.jsonl", benchmark="flan", category="qa", level="fully_held_out",
             metric="accuracy", mode="rank", shots=[0]),
        dict(task="capital", data=str(SNI / "task1146_country_capital.json"), benchmark="sni",
             category="qa", level="fully_supervised", metric="rougeL", mode="generate", shots=[0]),
    ]  # fmt: skip
    (tmp / "suite.yaml").write_text(
        yaml.safe_dump({"entries": entries, "max_instances": 4, "max_new_tokens": 8})
    )
    return tmp / "suite.yaml"


def test_best_model_tracks_the_best_selection_score(tiny_preset, suite_path, tmp_path):
    workdir = tmp_path / "run"
    cfg = run_config(
        tiny_preset, workdir, train={"max_steps": 2}, eval={"every_steps": 1, "suite": str(suite_path)}
    )
    train_and_evaluate(cfg, progress=False)
    scores = {
        r["step"]: r["suite/selection_score"]
        for r in read_jsonl(workdir / "metrics.jsonl")
        if "suite/selection_score" in r
    }
    assert sorted(scores) == [1, 2]
    assert all(
        f"suite/{level}/0shot" in r
        for r in read_jsonl(workdir / "metrics.jsonl")
        if "suite/selection_score" in r
        for level in ("fully_held_out", "fully_supervised")
    )
    best_step = min(step for step, score in scores.items() if score == max(scores.values()))
    marker = read_marker(workdir / "best")
    assert marker["step"] == best_step and marker["selection_score"] == pytest.approx(scores[best_step])
    for step in scores:  # each evaluation's files
        metrics = json.loads((workdir / "eval" / "suite" / str(step) / "metrics.json").read_text())
        assert metrics["selection_score"] == pytest.approx(scores[step])
    loaded = load_pretrained(workdir / "best", scan_layers=True)  # as trained: its programs are compiled
    again = run_suite(
        loaded.model,
        loaded.params,
        loaded.tokenizer,
        load_suite(suite_path),
        None,
        SuiteSettings(batch_size=8),
    )
    assert again.metrics["selection_score"] == pytest.approx(scores[best_step], abs=1e-3)
    export_hf(workdir / "best", tmp_path / "hf")  # --to-hf --input RUN/best
    assert (tmp_path / "hf" / "config.json").is_file()


def test_bad_suite_stops_the_run_before_training(tiny_preset, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"task": "x", "data": "nowhere.jsonl"}]))
    cfg = run_config(tiny_preset, tmp_path / "run", eval={"every_steps": 1, "suite": str(bad)})
    with pytest.raises(ValueError, match=r"entry 0 \(x\): missing key 'benchmark'"):
        train_and_evaluate(cfg, progress=False)
    assert not Path(tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("add_bos", [True, False])
def test_suite_prompts_are_encoded_as_the_training_data(monkeypatch, tmp_path, add_bos):
    """The hook's settings follow data.add_bos, as eval.tasks' do: a run trained on prompts that start
    with </s> is evaluated on such prompts."""
    cfg = run_config("tiny", tmp_path / "run", data={"add_bos": add_bos}, eval={"suite": "suite.yaml"})
    seen = []

    def evaluate(*args):
        seen.append(args[8])  # the SuiteSettings
        return {"selection_score": None}

    monkeypatch.setattr(suite_hook_module, "evaluate_suite_at_step", evaluate)
    run = SimpleNamespace(
        cfg=cfg, model=None, state=SimpleNamespace(params=None), tokenizer=None, workdir=tmp_path,
        writer=None, opt_config=None, mesh=None, rules=None, report=lambda line: None,
    )  # fmt: skip
    suite_hook_module.suite_hook(run, 1)
    assert [settings.add_bos for settings in seen] == [add_bos]
    assert seen[0].batch_size == cfg.eval_batch_size
    assert SuiteSettings().add_bos == PROMPT_ADD_BOS  # the project's convention where nothing says otherwise


def test_best_of_another_suite_is_replaced_not_compared(monkeypatch, tmp_path, suite_path):
    """A resumed run whose eval.suite changed: best/'s score is of another suite, so the first score of
    this one replaces it however it compares; the same suite (named relatively or not) is compared."""
    workdir = tmp_path / "run"
    (workdir / "best").mkdir(parents=True)

    def best_chosen_on(suite, score):
        marker = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "suite": suite}
        (workdir / "best" / MARKER).write_text(json.dumps({**marker, "step": 2, "selection_score": score}))

    metrics = {"selection_score": 10.0, "per_level": {}, "per_shot": {}, "run": {"compilations": 0}}
    monkeypatch.setattr(suite_hook_module, "run_suite", lambda *a, **k: SimpleNamespace(metrics=metrics))
    saved = []
    monkeypatch.setattr(suite_hook_module, "save_model", lambda *a, **k: saved.append(k["extra_marker"]))
    writer = SimpleNamespace(write=lambda step, scalars: None)

    def evaluate(suite):
        args = (None, None, None, suite, workdir, 3, writer, None, SuiteSettings(), None, None)
        suite_hook_module.evaluate_suite_at_step(*args)

    best_chosen_on(str(tmp_path / "other_suite.yaml"), 90.0)
    evaluate(suite_path)
    assert saved == [{"step": 3, "selection_score": 10.0, "suite": str(suite_path)}]
    best_chosen_on(str(suite_path), 90.0)
    monkeypatch.chdir(suite_path.parent)
    evaluate(suite_path.name)  # the same suite, named relatively: 10 does not beat its 90
    assert len(saved) == 1
