"""Evaluation data and prompts: every reference kept, the first N instances, split files, both prompt
formats written out by hand, and bad input refused with the file and key named."""

import json

import pytest
from finetune_helpers import SNI, SNI_TRAIN_SPLIT

from optiml_jax.data import DataError
from optiml_jax.eval.prompts import build_prompt, tk_instruct_prompt
from optiml_jax.eval.tasks import EvalDataError, load_eval_tasks


def write_task(path, instances, definition=("Answer the question",), categories=("Textual Entailment",)):
    data = {
        "Categories": list(categories),
        "Definition": list(definition),
        "Positive Examples": [
            {"input": "Is fire hot", "output": "yes", "explanation": "it is"},
            {"input": "Is ice hot?", "output": "no."},
        ],
        "Negative Examples": [],
        "Instances": instances,
    }
    path.write_text(json.dumps(data, indent=4))
    return path


INSTANCES = [
    {"id": f"t-{i}", "input": f"question {i}", "output": [f"answer {i}", f"alt {i}"]} for i in range(5)
]


def test_sni_keeps_every_reference_and_the_first_instances(tmp_path):
    write_task(tmp_path / "task001_demo.json", INSTANCES)
    (task,) = load_eval_tasks(tmp_path, max_instances=3)
    assert task.name == "task001_demo" and task.category == "textual_entailment"
    assert [i.id for i in task.instances] == ["t-0", "t-1", "t-2"]
    assert task.instances[1].references == ("answer 1", "alt 1")
    assert task.instances[1].source.endswith("task001_demo.json#t-1")
    assert len(load_eval_tasks(tmp_path, max_instances=0)[0].instances) == 5


def test_split_file_selects_tasks_and_reports_none_matching(tmp_path):
    write_task(tmp_path / "task001_a.json", INSTANCES)
    write_task(tmp_path / "task002_b.json", INSTANCES)
    split = tmp_path / "test_tasks.txt"
    split.write_text("task002_b\ntask999_missing\n")
    assert [t.name for t in load_eval_tasks(tmp_path, split)] == ["task002_b"]
    split.write_text("task999_missing\n")
    with pytest.raises(DataError, match="test_tasks.txt: none of the 2 task files"):
        load_eval_tasks(tmp_path, split)


@pytest.mark.parametrize(
    "instance,message",
    [
        ({"id": "x-1", "input": "q"}, r"task001_bad.json#x-1: no 'output'"),
        ({"id": "x-1", "input": "q", "output": []}, r"#x-1: 'output' must be a non-empty list"),
        ({"id": "x-1", "input": "q", "output": ["a", 3]}, r"#x-1: 'output' holds a non-string"),
        ({"id": "x-1", "input": 5, "output": ["a"]}, r"#x-1: 'input' must be a string"),
    ],
)
def test_sni_instance_without_references_is_an_error_naming_file_and_key(tmp_path, instance, message):
    write_task(tmp_path / "task001_bad.json", [instance])
    with pytest.raises(EvalDataError, match=message):
        load_eval_tasks(tmp_path)


def test_jsonl_references_from_tgt_list_or_references_field(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"src": "Q1 ", "tgt": "a"}),
                "",
                json.dumps({"src": "Q2", "tgt": ["b", "B"]}),
                json.dumps(
                    {
                        "src": "Q3",
                        "tgt": "c",
                        "references": ["c", "C"],
                        "task": "other",
                        "category": "Word Analogy",
                    }
                ),
            ]
        )
        + "\n"
    )
    tasks = {t.name: t for t in load_eval_tasks(path)}
    qa, other = tasks["qa"], tasks["other"]
    assert [(i.id, i.references) for i in qa.instances] == [(1, ("a",)), (3, ("b", "B"))]
    assert other.instances[0].references == ("c", "C") and other.category == "word_analogy"
    assert qa.category == "uncategorized"
    assert build_prompt(qa, qa.instances[0]) == "Q1"  # trailing spaces go, as in training
    path.write_text(json.dumps({"src": "Q"}) + "\n")
    with pytest.raises(EvalDataError, match=r"qa.jsonl:1: no 'tgt', 'references' or 'label'"):
        load_eval_tasks(path)


def test_optiml_prompt_uses_the_fixed_delimiter(tmp_path):
    write_task(tmp_path / "task001_demo.json", INSTANCES)
    (task,) = load_eval_tasks(tmp_path)
    inst = task.instances[0]
    assert build_prompt(task, inst) == "Instructions: Answer the question\n\nInput: question 0\nOutput:"
    assert build_prompt(task, inst, shots=2, delimiter=" A:") == (
        "Instructions: Answer the question\n\nInput: Is fire hot A: yes\n\nInput: Is ice hot? A: no.\n\n"
        "Input: question 0 A:"
    )


def test_tk_instruct_prompt_as_its_collator_writes_it(tmp_path):
    write_task(tmp_path / "task001_demo.json", INSTANCES)
    (task,) = load_eval_tasks(tmp_path)
    inst = task.instances[0]
    expected = (
        "Definition: Answer the question.\n\n"
        " Positive Example 1 -\nInput: Is fire hot.\n Output: yes.\n\n"
        " Positive Example 2 -\nInput: Is ice hot?\n Output: no.\n\n"
        "Now complete the following example -\nInput: question 0.\nOutput:"
    )
    assert build_prompt(task, inst, template="tk_instruct", shots=2) == expected
    assert tk_instruct_prompt("Say it!", "") == (
        "Definition: Say it!\n\nNow complete the following example -\nInput: .\nOutput:"
    )


def test_shipped_sample_reads_with_its_empty_reference():
    tasks = {t.name: t for t in load_eval_tasks(SNI, SNI_TRAIN_SPLIT, max_instances=100)}
    assert len(tasks) == 8 and all(len(t.instances) == 100 for t in tasks.values())
    trivia = tasks["task1564_triviaqa_answer_generation"]
    assert trivia.instances[86].references == ("",)  # kept: the official scorer scores against it
    assert tasks["task833_poem_sentiment_classification"].category == "sentiment_analysis"
