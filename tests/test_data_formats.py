"""The data-format registry (data/formats/): a format registered by one module is read by training and
evaluation alike; format choices derive from it; JSONL records with other key names get a data.fields
hint; evaluation reads Parquet and data.fields mappings; an unusable SNI task file is named with the
instances it loses."""

import array
import dataclasses
import json
import logging
from pathlib import Path

import pytest
from simulated_processes import as_processes

from optiml_jax.config import ConfigError
from optiml_jax.data import DataConfig, DataError, Example, Fields, SkipStats, read_tasks
from optiml_jax.data.formats import Format, detect_format, format_choices, register, unregister
from optiml_jax.data.formats.base import records_eval_tasks
from optiml_jax.data.records import Shard
from optiml_jax.data.sources import read_span
from optiml_jax.eval.runner import tasks_from_config
from optiml_jax.eval.tasks import EvalDataError, load_eval_tasks
from optiml_jax.run_config import EvalTasksSection

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@dataclasses.dataclass(frozen=True)
class TsvSource:
    path: str
    task: str

    def example(self, start, end, line, index):
        src, tgt = read_span(self.path, start, end).decode().split("\t")
        return Example(task=self.task, src=src, tgt=tgt, source=f"{self.path}:{line}")


class TsvFormat(Format):
    """A tiny format of the test's own: `prompt<TAB>target` lines."""

    name = "tsv"
    suffixes = (".tsv",)

    def lines(self, path):
        offset = 0
        for number, raw in enumerate(Path(path).read_bytes().splitlines(keepends=True), start=1):
            yield number, offset, raw.rstrip(b"\n")
            offset += len(raw)

    def scan(self, path, fields, me, count):
        size, flat, skips = path.stat().st_size, array.array("q"), []
        for number, start, raw in self.lines(path):
            if size * me // count <= start < size * (me + 1) // count:
                if raw.count(b"\t") == 1:
                    flat.extend((start, start + len(raw), number, 0))
                else:
                    skips.append((number, "not_two_columns", ""))
        return {"skips": skips, "tasks": []}, flat

    def sources(self, path, fields, seed):
        return lambda task: TsvSource(path, task)

    def eval_tasks(self, path, split_file, max_instances, fields):
        records = (
            (number, f"{path}:{number}", dict(zip(("src", "tgt"), raw.decode().split("\t"))))
            for number, _, raw in self.lines(path)
        )
        return records_eval_tasks(path, records, max_instances, fields)


@pytest.fixture
def tsv_format():
    register(TsvFormat)
    yield
    unregister("tsv")


def test_a_format_registered_in_one_place_is_read_by_training_and_evaluation(tmp_path, tsv_format):
    path = tmp_path / "pairs.tsv"
    path.write_text("2+2=\t4\nbroken line\ncapital of France?\tParis\n")
    assert detect_format(path) == "tsv" and "tsv" in format_choices()
    assert DataConfig(train=str(path), format="tsv").format == "tsv"  # config choices come from it
    assert EvalTasksSection(data=str(path), format="tsv").format == "tsv"
    stats = SkipStats()
    (records,) = read_tasks(path, stats).values()
    assert [(e.src, e.tgt, e.source) for e in records] == [
        ("2+2=", "4", f"{path}:1"),
        ("capital of France?", "Paris", f"{path}:3"),
    ]
    assert stats.samples == {"not_two_columns": [f"{path}:2"]}
    # Two processes, each scanning its share as the format says, build the same index.
    shared = as_processes(2, lambda p, g: read_tasks(path, SkipStats(), shard=Shard(p, 2, g)))
    assert all(list(tasks["pairs"]) == list(records) for tasks in shared)
    path.write_text("2+2=\t4\ncapital of France?\tParis\n")
    (task,) = load_eval_tasks(path)
    assert task.name == "pairs" and [i.references for i in task.instances] == [("4",), ("Paris",)]
    unregister("tsv")
    with pytest.raises(ConfigError, match="data.format='tsv' is not one of auto, sni, jsonl, parquet"):
        DataConfig(train=str(path), format="tsv")
    register(TsvFormat)


def test_jsonl_with_other_key_names_gets_a_data_fields_hint(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"source": f"q{i}", "target": f"a{i}"}) + "\n" for i in range(3)))
    hint = "its keys are source, target: map them with data.fields.src=source data.fields.tgt=target"
    with pytest.raises(DataError, match=rf"qa.jsonl:1: missing_field \(no 'src' field; {hint}\)"):
        read_tasks(path, SkipStats("raise"))
    stats = SkipStats(log=False)
    assert read_tasks(path, stats) == {} and hint in stats.first_message
    with pytest.raises(EvalDataError, match=rf"qa.jsonl:1: 'src' must be a string \(the prompt\); {hint}$"):
        load_eval_tasks(path)
    fields = Fields(src="source", tgt="target")
    assert [e.tgt for e in read_tasks(path, SkipStats("raise"), fields=fields)["qa"]] == ["a0", "a1", "a2"]
    (task,) = load_eval_tasks(path, fields=fields)
    # In-training task evaluation takes the same mapping (eval.tasks.fields, evaluate's --fields).
    section = EvalTasksSection(data=str(path), fields="src=source, tgt=target")
    assert tasks_from_config(section) == [task]
    with pytest.raises(
        ConfigError, match=r"^fields: unknown key 'prompt' \(known: src, tgt, task, definition, benchmark\)$"
    ):
        EvalTasksSection(data=str(path), fields="prompt=source")
    with pytest.raises(
        ConfigError, match="^fields: expected NAME=COLUMN pairs separated by commas, got 'src'$"
    ):
        EvalTasksSection(data=str(path), fields="src")
    assert [(i.input, i.references) for i in task.instances] == [
        ("q0", ("a0",)),
        ("q1", ("a1",)),
        ("q2", ("a2",)),
    ]


def test_evaluation_reads_parquet_through_data_fields(tmp_path):
    rows = [
        {"inputs": "Is it hot?", "targets": "yes", "task_name": "weather", "references": None},
        {"inputs": "Is it cold?", "targets": "no", "task_name": "weather", "references": ["no", "nope"]},
        {"inputs": "2+2?", "targets": "4", "task_name": "math", "references": None},
    ]
    path = tmp_path / "flan.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    fields = Fields(src="inputs", tgt="targets", task="task_name")
    tasks = {t.name: t for t in load_eval_tasks(path, max_instances=0, fields=fields)}
    assert list(tasks) == ["weather", "math"]
    weather = tasks["weather"].instances
    assert [(i.id, i.input, i.references) for i in weather] == [
        ("row 0", "Is it hot?", ("yes",)),
        ("row 1", "Is it cold?", ("no", "nope")),
    ]
    assert tasks["math"].instances[0].source == f"{path}:row 2"
    assert load_eval_tasks(path, format="parquet", fields=fields)[0].path == str(path)
    definitions = tmp_path / "sni_style.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"Definition": ["Add."], "input": "2+2", "output": "4"}]), definitions
    )
    (task,) = load_eval_tasks(definitions, fields=Fields(src="input", tgt="output", definition="Definition"))
    assert task.is_sni and task.definition == "Add." and task.instances[0].input == "2+2"


def test_a_truncated_sni_task_file_is_named_with_the_instances_it_loses(tmp_path, caplog):
    good = {
        "Definition": ["Copy."],
        "Instances": [{"id": f"i{k}", "input": "x", "output": ["x"]} for k in range(7)],
    }
    (tmp_path / "task1_good.json").write_text(json.dumps(good))
    text = json.dumps(good, indent=1)
    (tmp_path / "task2_cut.json").write_text(text[: text.index('"i5"')])  # 5 instances begun, then cut
    stats = SkipStats()
    with caplog.at_level(logging.WARNING):
        tasks = read_tasks(tmp_path, stats)
    assert list(tasks) == ["task1_good"] and stats.counts == {"malformed_json": 1}
    cut = tmp_path / "task2_cut.json"
    assert f"{cut}:" in caplog.text and "whole task file skipped, its task loses 5 instance(s)" in caplog.text
    with pytest.raises(
        DataError, match=rf"^{cut}:\d+: malformed_json \(whole task file skipped, its task loses 5"
    ):
        read_tasks(tmp_path, SkipStats("raise"))
    with pytest.raises(EvalDataError, match=rf"^{cut}:\d+: not valid JSON \("):
        load_eval_tasks(tmp_path)
