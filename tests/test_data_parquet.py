"""Parquet data and hub datasets (data.fields, hf:NAME[:SPLIT]): generated files in the column layouts of
two public collections (SNI as definition/inputs/targets/task_name, FLAN as inputs/targets/task) read
back as a plain row-by-row reference says, as the same records in JSONL do, with the JSONL path's
guarantees: each process reads only its share of the row groups, skips are counted with their rows,
batches do not depend on the process count and resume is exact."""

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from simulated_processes import as_processes, process_loaders

from optiml_jax import run_config
from optiml_jax.config import ConfigError
from optiml_jax.data import DataConfig, DataError, read_tasks
from optiml_jax.data.formats import parquet as parquet_format
from optiml_jax.data.records import Shard
from optiml_jax.data.sources import Fields, SkipStats
from optiml_jax.data.templates import format_sni
from optiml_jax.eval.tasks import holdout_eval_tasks, load_eval_tasks

SNI_FIELDS = {"src": "inputs", "tgt": "targets", "task": "task_name", "definition": "definition"}
FLAN_FIELDS = {"src": "inputs", "tgt": "targets", "task": "task"}


def sni_rows(n=90):
    """Rows laid out as the hub's SNI (tasks in runs that cross row groups), with unusable ones."""
    rows = []
    for i in range(n):
        task = f"task{i // 25:03d}_demo"
        rows.append(
            {
                "id": f"{task}-{i}",
                "task_name": task,
                "definition": [f"Answer {task} well.\n"],
                "inputs": f"question {i} é😀" * (1 + i % 3),
                "targets": f"answer {i} ",
            }
        )
    # a null cell, an all-whitespace target, an empty definition, no task
    for i, key, value in (
        (7, "targets", None),
        (30, "targets", "  "),
        (41, "definition", []),
        (66, "task_name", ""),
    ):
        if i < n:
            rows[i][key] = value
    return rows


def flan_rows(n=70):
    rows = [
        {
            "inputs": f"Translate {i}: {'word ' * (i % 5)}",
            "targets": f"t{i}",
            "task": ("cot", "nli", "qa")[i % 3],
            "template_type": "zs_opt",
        }
        for i in range(n)
    ]
    for i, key, value in ((12, "inputs", None), (50, "targets", "")):
        if i < n:
            rows[i][key] = value
    return rows


def write_parquet(path, rows, group=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group)
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def expected_examples(rows, fields, seed=0):
    """task -> [(src, tgt)] built straight from the rows: what a reader must give."""
    tasks = {}
    for row in rows:
        src, tgt, task = row[fields["src"]], row[fields["tgt"]], row[fields["task"]]
        definition = row.get(fields.get("definition"))
        if not (isinstance(src, str) and isinstance(tgt, str) and tgt.strip() and task.strip()):
            continue
        if "definition" in fields:
            text = "\n".join(p.strip() for p in definition if p.strip())
            if not text:
                continue
            prompt = format_sni(text, src, tgt, seed=seed, task=task, index=len(tasks.get(task, [])))
            tasks.setdefault(task, []).append(prompt)
        else:
            tasks.setdefault(task, []).append((src, tgt))
    return tasks


@pytest.mark.parametrize("layout", ["sni", "flan"])
def test_parquet_rows_give_the_examples_and_skips_of_the_same_jsonl(tmp_path, layout):
    rows, fields = (sni_rows(), SNI_FIELDS) if layout == "sni" else (flan_rows(), FLAN_FIELDS)
    parquet = write_parquet(tmp_path / f"{layout}.parquet", rows)
    jsonl = write_jsonl(tmp_path / f"{layout}.jsonl", rows)
    assert pq.ParquetFile(parquet).metadata.num_row_groups == -(-len(rows) // 16)
    read = {}
    for path in (parquet, jsonl):
        stats = SkipStats()
        tasks = read_tasks(path, stats, fields=Fields(**fields), seed=3)
        read[path.suffix] = tasks, stats
        got = {name: [(e.src, e.tgt) for e in examples] for name, examples in tasks.items()}
        assert got == expected_examples(rows, fields, seed=3)
    (ptasks, pstats), (jtasks, jstats) = read[".parquet"], read[".jsonl"]
    assert pstats.as_dict() == jstats.as_dict()
    for name in ptasks:  # row N (from 0) of the Parquet file is line N + 1 of the JSONL file
        assert all(e.source.startswith(f"{parquet}:row ") for e in ptasks[name])
        assert [int(e.source.rsplit(" ", 1)[1]) for e in ptasks[name]] == [
            int(e.source.rsplit(":", 1)[1]) - 1 for e in jtasks[name]
        ]
    bad = [7, 30, 41, 66] if layout == "sni" else [12, 50]
    assert sorted(int(w.rsplit(" ", 1)[1]) for ws in pstats.samples.values() for w in ws) == bad
    assert sorted(int(w.rsplit(":", 1)[1]) - 1 for ws in jstats.samples.values() for w in ws) == bad
    if layout == "sni":
        assert pstats.as_dict() == {
            "bad_definition": 1,
            "empty_target": 1,
            "empty_task": 1,
            "non_string_field": 1,
        }
        assert pstats.samples["non_string_field"] == [f"{parquet}:row 7"]


def test_without_a_task_column_the_file_stem_names_the_task_and_shards_concatenate(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(30)]
    write_parquet(tmp_path / "d" / "train" / "00" / "mytask.parquet", rows[:20], group=7)
    write_parquet(tmp_path / "d" / "train" / "01" / "mytask.parquet", rows[20:], group=7)
    tasks = read_tasks(tmp_path / "d", SkipStats(), fields=Fields(src="prompt", tgt="answer"))
    assert list(tasks) == ["mytask"] and [(e.src, e.tgt) for e in tasks["mytask"]] == [
        (r["prompt"], r["answer"]) for r in rows
    ]
    assert tasks["mytask"][25].source == f"{tmp_path / 'd/train/01/mytask.parquet'}:row 5"


class GroupReads:
    """Which row groups (file, group) each simulated process (thread) reads, at start-up and while
    training."""

    def __init__(self, monkeypatch):
        self.reads, self.owner, real = {}, {}, parquet_format.read_row_group

        def read_row_group(handle, path, group, columns):
            self.reads.setdefault(self.owner.get(threading.get_ident(), -1), []).append((str(path), group))
            return real(handle, path, group, columns)

        monkeypatch.setattr(parquet_format, "read_row_group", read_row_group)

    def register(self, p):
        self.owner[threading.get_ident()] = p


def build(data, p=0, n=1, allgather=None, reads=None, **kw):
    return process_loaders(data, p, n, allgather, reads, seed=5, seq_len=96, **kw)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_each_process_reads_its_share_of_row_groups_and_batches_do_not_depend_on_the_count(
    tmp_path, monkeypatch
):
    root = tmp_path / "sni"
    rows = sni_rows(120)
    write_parquet(root / "a.parquet", rows[:70], group=8)
    write_parquet(root / "b.parquet", rows[70:], group=5)
    data = dict(train=str(root), fields=SNI_FIELDS, eps=30, eval_holdout=3)
    single_train, single_eval = build(data)
    reference, reference_eval = take(single_train, 5), list(single_eval)
    reads = GroupReads(monkeypatch)
    built = as_processes(2, lambda p, g: build(data, p, 2, g, reads))
    every = {(str(root / f), g) for f, n in (("a.parquet", 9), ("b.parquet", 10)) for g in range(n)}
    assert {f: pq.ParquetFile(root / f).metadata.num_row_groups for f in ("a.parquet", "b.parquet")} == {
        "a.parquet": 9,
        "b.parquet": 10,
    }
    shares = [reads.reads[p] for p in range(2)]  # each group read once, by one process, and both read some
    assert sorted(shares[0] + shares[1]) == sorted(every) and all(len(s) >= 4 for s in shares)
    for train, _ev in built:
        assert train.skip_stats.as_dict() == single_train.skip_stats.as_dict()
        assert train.skip_stats.samples == single_train.skip_stats.samples
        assert train.fingerprint == single_train.fingerprint
    reads.reads.clear()

    def iterate(p, allgather):
        reads.register(p)
        return take(built[p][0], 5), list(built[p][1])

    batches = as_processes(2, iterate)
    # While training a process reads at most one group per example of its own rows (rows 3p..3p+2 of 6).
    num_eval = sum(map(len, single_eval.tasks.values()))
    for p in range(2):
        own = sum(1 for i in range(built[p][0].mixture.position) if i % 6 // 3 == p)
        own += sum(1 for j in range(num_eval) if j % 6 // 3 == p)
        assert 0 < len(reads.reads[p]) <= own
    for k, ref in enumerate(reference):
        for key in ref:
            np.testing.assert_array_equal(np.concatenate([b[0][k][key] for b in batches]), ref[key])
    assert len(batches[0][1]) == len(reference_eval)
    for k, ref in enumerate(reference_eval):
        np.testing.assert_array_equal(np.concatenate([b[1][k]["targets"] for b in batches]), ref["targets"])


def test_parquet_resume_is_exact(tmp_path):
    path = write_parquet(tmp_path / "flan.parquet", flan_rows(200), group=9)
    data = dict(train=str(path), fields=FLAN_FIELDS, eps=50)
    straight = build(data)[0]
    expected = take(straight, 7)
    first = build(data)[0]
    take(first, 3)
    state = json.loads(json.dumps(first.get_state()))
    resumed = build(data, state=state)[0]
    for want, got in zip(expected[3:], take(resumed, 4)):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_column_and_field_errors_are_one_line_naming_file_and_column(tmp_path):
    rows = flan_rows()
    path = write_parquet(tmp_path / "flan.parquet", rows)
    with pytest.raises(DataError) as e:
        read_tasks(path, SkipStats(), fields=Fields(src="inputs", tgt="answers"))
    assert str(e.value) == (
        f"{path}: no column 'answers' (data.fields.tgt); its columns are inputs, targets, task, template_type"
    )
    numbers = write_parquet(tmp_path / "n.parquet", [{"src": f"q{i}", "tgt": i} for i in range(5)])
    with pytest.raises(
        DataError, match=rf"^{numbers}: column 'tgt' \(data.fields.tgt\) holds int64, not strings$"
    ):
        read_tasks(numbers, SkipStats())
    # Evaluation reads Parquet through the same registry and Fields (issue #21: it refused Parquet).
    with pytest.raises(DataError) as e:
        load_eval_tasks(path)
    assert str(e.value) == (
        f"{path}: no column 'src' (data.fields.src); its columns are inputs, targets, task, template_type: "
        f"map them with data.fields.src=inputs data.fields.tgt=targets"
    )
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk.parquet: not a readable Parquet file"):
        read_tasks(tmp_path / "junk.parquet", SkipStats())
    with pytest.raises(
        DataError, match=rf"^{path}:row 12: non_string_field \('inputs' is null, expected string\)"
    ):
        read_tasks(path, SkipStats("raise"), fields=Fields(**FLAN_FIELDS))
    with pytest.raises(
        ConfigError,
        match=r"^data.fields: unknown key 'prompt' \(known: src, tgt, task, definition, benchmark\)$",
    ):
        DataConfig(train=str(path), fields={"prompt": "inputs"})
    with pytest.raises(ConfigError, match=r"data.fields: tgt must name a column"):
        DataConfig(train=str(path), fields={"tgt": ["a"]})
    with pytest.raises(ConfigError, match=r"^data: data.fields: unknown key 'prompt'"):
        run_config.from_dict(
            {"model": "preset:tiny", "data": {"train": str(path), "fields": {"prompt": "x"}}}
        )
    # The same mapping renames JSONL keys; a line without the mapped key is skipped and located.
    jsonl = write_jsonl(tmp_path / "flan.jsonl", rows[:3] + [{"inputs": "x"}])
    stats = SkipStats()
    tasks = read_tasks(jsonl, stats, fields=Fields(**FLAN_FIELDS))
    assert {k: [e.src for e in v] for k, v in tasks.items()} == {r["task"]: [r["inputs"]] for r in rows[:3]}
    assert stats.samples == {"missing_field": [f"{jsonl}:4"]}


def test_a_row_changed_under_the_run_is_named(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", [{"src": f"q{i}", "tgt": "a"} for i in range(20)], group=6)
    records = read_tasks(path, SkipStats())["t"]
    write_parquet(path, [{"src": f"q{i}", "tgt": None} for i in range(20)], group=6)
    with pytest.raises(DataError, match=rf"^{path}:row 13: the row no longer holds the usable record"):
        records[13]


def test_held_out_definition_rows_evaluate_with_their_definition(tmp_path):
    path = write_parquet(tmp_path / "sni.parquet", sni_rows(60))
    _, ev = build(dict(train=str(path), fields=SNI_FIELDS, eval_holdout=2))
    tasks = {t.name: t for t in holdout_eval_tasks(ev.tasks)}
    assert sorted(tasks) == ["task000_demo", "task001_demo", "task002_demo"]
    task = tasks["task001_demo"]
    assert task.definition == "Answer task001_demo well." and task.is_sni
    assert [(i.id, i.input, i.references) for i in task.instances] == [
        (f"row {r}", sni_rows(60)[r]["inputs"], (f"answer {r}",)) for r in (48, 49)
    ]
    # Plain rows are ready prompts, as JSONL lines (whose ids stay their line numbers), and task files'
    # instances still get every reference from the file.
    rows = flan_rows(30)
    for path, ids in (
        (write_parquet(tmp_path / "flan.parquet", rows), ["row 28", "row 29"]),
        (write_jsonl(tmp_path / "flan.jsonl", rows), [29, 30]),
    ):
        _, ev = build(dict(train=str(path), fields={"src": "inputs", "tgt": "targets"}, eval_holdout=2))
        (task,) = holdout_eval_tasks(ev.tasks)
        assert not task.is_sni and [(i.id, i.input, i.references) for i in task.instances] == [
            (ids[k], rows[28 + k]["inputs"], (rows[28 + k]["targets"],)) for k in range(2)
        ]
    sni = Path(__file__).resolve().parents[1] / "optiml_jax/assets/data/sni/task1146_country_capital.json"
    _, ev = build(dict(train=str(sni), eval_holdout=1))
    (task,) = holdout_eval_tasks(ev.tasks)
    last = json.loads(sni.read_text(encoding="utf-8"))["Instances"][-1]
    assert task.is_sni and [(i.id, i.references) for i in task.instances] == [
        (last["id"], tuple(last["output"]))
    ]


# ---------------------------------------------------------------------- hf:NAME[:SPLIT]
def test_hub_dataset_offline_or_without_datasets_is_one_line_naming_the_local_alternative(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(DataError) as e:
        read_tasks("hf:someone/not-cached-anywhere:validation", SkipStats())
    message = str(e.value)
    assert "\n" not in message and message.startswith(
        "hf:someone/not-cached-anywhere:validation: datasets.load_dataset('someone/not-cached-anywhere', "
        "split='validation') failed ("
    )
    assert message.endswith("download the files and set data.train to a local .parquet/.jsonl path")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(
        DataError,
        match=r"^hf:x/y: loading a hub dataset needs the `datasets` package, which is "
        r"not installed .*download the files and set data.train to a local",
    ):
        read_tasks("hf:x/y", SkipStats())


def test_hub_dataset_is_materialised_once_as_parquet_and_read_like_a_local_file(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = flan_rows()
    calls = []

    def load_dataset(name, split=None):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    stats = SkipStats()
    tasks = read_tasks("hf:org/flan-sample", stats, fields=Fields(**FLAN_FIELDS))
    assert calls == [("org/flan-sample", "train")]
    assert {k: [(e.src, e.tgt) for e in v] for k, v in tasks.items()} == expected_examples(rows, FLAN_FIELDS)
    written = sorted((tmp_path / "cache").rglob("*.parquet"))
    assert len(written) == 1 and written[0].name == "flan-sample.parquet" and stats.total == 2
    assert tasks["qa"][0].source.startswith(f"{written[0]}:row ")
    # A second read (another run, or another process) reuses the file; without a task column the
    # dataset's name names its one task.
    before = written[0].stat().st_mtime_ns
    again = read_tasks("hf:org/flan-sample:train", SkipStats(), fields=Fields(src="inputs", tgt="targets"))
    assert list(again) == ["flan-sample"] and len(again["flan-sample"]) == 68
    assert (
        sorted((tmp_path / "cache").rglob("*.parquet")) == written and written[0].stat().st_mtime_ns == before
    )
    # Several processes: each materialises it, they agree on the files and split the row groups.
    built = as_processes(
        2,
        lambda p, g: read_tasks(
            "hf:org/flan-sample", SkipStats(), fields=Fields(**FLAN_FIELDS), shard=Shard(p, 2, g)
        ),
    )
    assert all({k: len(v) for k, v in b.items()} == {k: len(v) for k, v in tasks.items()} for b in built)
    # Evaluation reads the same hub dataset through the same registry (its null rows are bad input there).
    found = load_eval_tasks(
        "hf:org/flan-sample", max_instances=0, fields=Fields(src="targets", tgt="targets")
    )
    assert sorted(t.name for t in found) == sorted(tasks) and sum(len(t.instances) for t in found) == 70
    assert all(i.source.startswith(f"{written[0]}:row ") for t in found for i in t.instances)


# ---------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_finetune_cli_trains_on_a_parquet_file_with_a_column_mapping(tmp_path, capsys, tiny_preset):
    from optiml_jax.cli.finetune import main

    path = write_parquet(tmp_path / "sni.parquet", sni_rows(60))
    workdir = tmp_path / "run"
    common = [
        f"model=preset:{tiny_preset}",
        f"data.train={path}",
        "data.eval_holdout=null",
        "eval.tasks=null",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.seq_len=64",
        "eval.every_steps=0",
        "eval.num_samples=0",
        "checkpoint.every_steps=0",
        "checkpoint.save_final=false",
        "train.peak_flops_per_device=1e9",
        "train.log_every_steps=1",
        "--no-progress",
    ]
    code = main(
        [
            "--config",
            "demo",
            f"workdir={workdir}",
            *common,
            "data.fields={src: inputs, tgt: targets, task: task_name, definition: definition}",
        ]
    )
    assert code == 0
    assert "done: step 2" in capsys.readouterr().out
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "train/loss" in r][-1]
    assert last["step"] == 2 and np.isfinite(last["train/loss"])
    assert last["data/skipped/non_string_field"] == 1 and last["data/skipped/bad_definition"] == 1
    bad = main(
        ["--config", "demo", f"workdir={tmp_path / 'bad'}", *common, "data.fields={src: inputs, tgt: answer}"]
    )
    assert bad == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {path}: no column 'answer' (data.fields.tgt); its columns are id, task_name, definition, "
        f"inputs, targets"
    )
