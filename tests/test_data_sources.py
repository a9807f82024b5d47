"""Readers: the real SNI sample in data/sni and metaseq-style JSONL files and directories."""

import json
import logging
from pathlib import Path

import pytest
from finetune_helpers import SNI_TEST_TASKS, SNI_TRAIN_SPLIT

from optiml_jax.data.formats import detect_format
from optiml_jax.data.formats.sni import read_sni_task
from optiml_jax.data.records import read_jsonl, read_tasks
from optiml_jax.data.sources import DataError, SkipStats

SNI = Path(__file__).resolve().parents[1] / "optiml_jax" / "assets" / "data" / "sni"
TASK1564 = SNI / "task1564_triviaqa_answer_generation.json"
EMPTY_ID = "task1564-1ba86d73c8224fad9b4d88f37a37a316"


def test_sni_sample_counts_and_empty_output(caplog):
    stats = SkipStats()
    with caplog.at_level(logging.WARNING):
        tasks = read_tasks(SNI, stats, split_file=SNI_TRAIN_SPLIT)
    assert len(tasks) == 8
    sizes = {name: len(examples) for name, examples in tasks.items()}
    assert sizes.pop("task1564_triviaqa_answer_generation") == 108  # 109 instances, one output is ""
    assert set(sizes.values()) == {200}
    assert stats.as_dict() == {"empty_target": 1}
    assert stats.samples["empty_target"] == [f"{TASK1564}#{EMPTY_ID}"]
    assert f"{TASK1564}#{EMPTY_ID}" in caplog.text
    assert all(e.tgt.strip() and e.src.startswith("Instructions: ") for v in tasks.values() for e in v)


def test_sni_task_fields_and_first_nonempty_output():
    task = read_sni_task(SNI / "task1146_country_capital.json", SkipStats())
    assert task.name == "task1146_country_capital"
    assert task.definition.startswith("In this task, you are given a country name")
    assert len(task.positive_examples) == 2 and task.positive_examples[0] == ("United States", "Washington")
    assert len(task.instances) == 200
    raw = json.loads((SNI / "task1146_country_capital.json").read_text(encoding="utf-8"))["Instances"][0]
    assert task.instances[0] == (raw["id"], raw["input"], raw["output"][0])


def test_sni_input_ending_with_colon_gets_no_delimiter():
    # The paper's rule is literal: task833 has two poem lines ending in ":", which get no delimiter.
    examples = read_tasks(SNI / "task833_poem_sentiment_classification.json", SkipStats())
    srcs = [e.src for e in examples["task833_poem_sentiment_classification"]]
    ending = [
        s
        for s in srcs
        if s.endswith(":") and not s.endswith(("Answer:", "A:", "Output:", "answer:", "output:"))
    ]
    assert [s.rsplit("Input: ", 1)[1][-10:] for s in ending] == ["e of gold:", "ter sleep:"]


def test_sni_split_file(tmp_path):
    stats = SkipStats()
    assert len(read_tasks(SNI, stats, split_file=SNI / "splits/default/train_tasks.txt")) == 8
    assert sorted(read_tasks(SNI, stats, split_file=SNI / "splits/default/test_tasks.txt")) == list(
        SNI_TEST_TASKS
    )
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("task0_not_in_the_sample\n")
    with pytest.raises(DataError, match="none of the 10 task files"):
        read_tasks(SNI, stats, split_file=unknown)
    split = tmp_path / "mine.txt"
    split.write_text("# two tasks\ntask1146_country_capital\n\ntask1508_wordnet_antonyms.json\n")
    assert sorted(read_tasks(SNI, stats, split_file=split)) == [
        "task1146_country_capital",
        "task1508_wordnet_antonyms",
    ]


def test_sni_few_shot_uses_positive_examples():
    examples = read_tasks(
        SNI / "task1508_wordnet_antonyms.json", SkipStats(), template="few_shot", num_shots=2
    )["task1508_wordnet_antonyms"]
    assert examples[0].src.count("Input: ") == 3 and "Input: able" in examples[0].src


def test_sni_instances_share_their_task_text_and_are_formatted_on_demand():
    from optiml_jax.data.templates import format_sni

    task = read_sni_task(SNI / "task1508_wordnet_antonyms.json", SkipStats())
    examples = read_tasks(
        SNI / "task1508_wordnet_antonyms.json", SkipStats(), template="few_shot", num_shots=2, seed=3
    )["task1508_wordnet_antonyms"]
    # One definition and one exemplar tuple for the whole task, not a formatted prompt per instance.
    assert all(
        e.definition is examples[0].definition and e.exemplars is examples[0].exemplars for e in examples
    )
    ident, text, output = task.instances[5]
    assert examples[5].source.endswith(f"#{ident}")
    assert (examples[5].src, examples[5].tgt) == format_sni(
        task.definition, text, output, exemplars=task.positive_examples[:2], seed=3, task=task.name, index=5
    )


def test_sni_raise_names_the_instance():
    with pytest.raises(DataError, match=f"task1564_triviaqa_answer_generation.json#{EMPTY_ID}: empty_target"):
        read_tasks(SNI, SkipStats("raise"))


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_jsonl_file(tmp_path):
    f = tmp_path / "qa.jsonl"
    write_jsonl(
        f, [{"src": "Q: 1+1?", "tgt": "2"}, {"src": "", "tgt": "plain text"}, {"src": "x", "tgt": " "}]
    )
    stats = SkipStats()
    examples = list(read_jsonl(f, stats))
    assert [(e.task, e.src, e.tgt, e.source) for e in examples] == [
        ("qa", "Q: 1+1?", "2", f"{f}:1"),
        ("qa", "", "plain text", f"{f}:2"),
    ]
    assert stats.as_dict() == {"empty_target": 1} and stats.samples["empty_target"] == [f"{f}:3"]
    assert detect_format(f) == "jsonl" and detect_format(TASK1564) == "sni"


def test_jsonl_metaseq_directory_layout(tmp_path):
    root = tmp_path / "data" / "train"
    write_jsonl(root / "00" / "taskA.jsonl", [{"src": "a0", "tgt": "A0"}])
    write_jsonl(root / "01" / "taskA.jsonl", [{"src": "a1", "tgt": "A1"}, {"src": "a2", "tgt": "A2"}])
    write_jsonl(root / "00" / "taskB.jsonl", [{"src": "b0", "tgt": "B0"}])
    (root / "00" / "notes.txt").write_text("ignored")
    assert detect_format(tmp_path / "data") == "jsonl"
    tasks = read_tasks(tmp_path / "data", SkipStats())
    assert {k: [e.src for e in v] for k, v in tasks.items()} == {"taskA": ["a0", "a1", "a2"], "taskB": ["b0"]}
    assert tasks["taskA"][1].source == f"{root / '01' / 'taskA.jsonl'}:1"
    with pytest.raises(DataError, match="SNI task files only"):
        read_tasks(tmp_path / "data", SkipStats(), template="few_shot", num_shots=1)


def test_missing_or_ambiguous_paths(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_tasks(tmp_path / "nope", SkipStats())
    with pytest.raises(DataError, match="neither"):
        read_tasks(tmp_path, SkipStats())
    write_jsonl(tmp_path / "x.jsonl", [{"src": "a", "tgt": "b"}])
    (tmp_path / "task1_x.json").write_text("{}")
    with pytest.raises(DataError, match="set data.format"):
        read_tasks(tmp_path, SkipStats())
    assert list(read_tasks(tmp_path, SkipStats(), format="jsonl")) == ["x"]
