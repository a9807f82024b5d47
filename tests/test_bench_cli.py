"""`python -m optiml_jax.bench build` / `optiml-bench`: bad input as one clear error line (exit 2), and a
built bench read by fine-tuning's data loader (data.train=DIR/train) and by evaluation (DIR/test)."""

import collections
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml
from bench_fixtures import REGISTRY, SPLIT, make_collections, make_registry_collections, write_yaml
from fake_tokenizer import ByteTokenizer

from optiml_jax.bench.registry import load_registry
from optiml_jax.bench.splits import load_split
from optiml_jax.bench.tasks import INSTRUCTION_TYPES, benchmark_of
from optiml_jax.cli.bench import CONFIGS, main
from optiml_jax.config import ASSETS_DIR
from optiml_jax.data import DataConfig, build_loaders
from optiml_jax.data.formats.base import category_name
from optiml_jax.eval.tasks import load_eval_tasks

SUITES = ASSETS_DIR / "configs" / "eval"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    collections = make_collections(root / "collections")
    return (
        root,
        collections,
        write_yaml(root / "registry.yaml", REGISTRY),
        write_yaml(root / "split.yaml", SPLIT),
    )


def run(inputs, *extra, collections=None, registry=None, split=None, output="out"):
    root, given, default_registry, default_split = inputs
    argv = ["build", "--quiet", "--workers", "1", "--output", str(root / output)]
    for name, path in (collections or given).items():
        argv += ["--collection", f"{name}={path}"]
    argv += ["--registry", registry or default_registry, "--split", split or default_split, *extra]
    return main(argv)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def built(inputs):
    assert run(inputs, output="built") == 0
    return inputs[0] / "built"


def test_build_writes_the_bench(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert (
        manifest["settings"]["max_per_task"] == 100_000
        and manifest["settings"]["max_per_task_flan"] == 30_000
    )
    assert manifest["settings"]["overlap_threshold"] == 0.01


def test_a_bad_collection_path_is_one_line(inputs, capsys, tmp_path):
    assert run(inputs, collections={"crossfit": str(tmp_path / "missing")}, output="x") == 2
    assert (
        error_line(capsys)
        == f"error: --collection crossfit={tmp_path / 'missing'}: no such file or directory"
    )
    assert run(inputs, collections={"nope": str(tmp_path)}, output="x") == 2
    assert "expected NAME=PATH with NAME one of sni, promptsource" in error_line(capsys)
    assert not (inputs[0] / "x").exists()


def test_a_bad_registry_is_one_line(inputs, capsys, tmp_path):
    bad = {"tasks": {"flan_rte": {"category": "Textual Entailment", "source": ["rte"]}}}
    assert run(inputs, registry=write_yaml(tmp_path / "r.yaml", bad), output="x") == 2
    assert "r.yaml: tasks.flan_rte: unknown key 'source'" in error_line(capsys)
    missing = {"tasks": {k: v for k, v in REGISTRY["tasks"].items() if k != "exmix_unrelated"}}
    assert run(inputs, registry=write_yaml(tmp_path / "m.yaml", missing), output="x") == 2
    assert "task 'exmix_unrelated' (exmix) has no category: add it to" in error_line(capsys)
    # every uncategorised task in the one line: a new dump is fixed in one edit
    exmix = {k: v for k, v in REGISTRY["tasks"].items() if not k.startswith("exmix_")}
    assert run(inputs, registry=write_yaml(tmp_path / "n.yaml", {"tasks": exmix}), output="x") == 2
    line = error_line(capsys)
    assert (
        "2 tasks have no category: 'exmix_rte_copy' (exmix), 'exmix_unrelated' (exmix); add them to" in line
    )
    (tmp_path / "broken.yaml").write_text("tasks: [unclosed")
    assert run(inputs, registry=str(tmp_path / "broken.yaml"), output="x") == 2
    assert "broken.yaml: not valid YAML" in error_line(capsys)


def test_a_bad_split_is_one_line_with_near_matches(inputs, capsys, tmp_path):
    typo = {**SPLIT, "dev_tasks": ["flan_squad_v2"]}
    assert run(inputs, split=write_yaml(tmp_path / "s.yaml", typo), output="x") == 2
    assert error_line(capsys).endswith(
        "s.yaml: dev_tasks: no task 'flan_squad_v2' (near matches: flan_squad_v1)"
    )
    category = {**SPLIT, "fully_held_out_categories": ["Textual Entailmnet"]}
    assert run(inputs, split=write_yaml(tmp_path / "c.yaml", category), output="x") == 2
    assert "no category 'Textual Entailmnet' (near matches: Textual Entailment)" in error_line(capsys)
    dev = {**SPLIT, "dev_categories": ["Question Answerin"]}
    assert run(inputs, split=write_yaml(tmp_path / "d.yaml", dev), output="x") == 2
    assert (
        "d.yaml: dev_categories: no category 'Question Answerin' (near matches: Question Answering"
        in error_line(capsys)
    )
    assert run(inputs, split=str(tmp_path / "none.yaml"), output="x") == 2
    assert error_line(capsys) == f"error: {tmp_path / 'none.yaml'}: split file not found"


def test_names_of_collections_not_given_are_skipped(inputs, tmp_path):
    split = {**SPLIT, "partially_supervised_tasks": ["crossfit_absent", *SPLIT["partially_supervised_tasks"]]}
    only = {"sni": inputs[1]["sni"], "flan": inputs[1]["flan"], "promptsource": inputs[1]["promptsource"]}
    assert run(inputs, collections=only, split=write_yaml(tmp_path / "s.yaml", split), output="partial") == 0


def test_an_existing_output_is_refused(inputs, built, capsys):
    assert run(inputs, output="built") == 2
    assert "exists and is not empty" in error_line(capsys)


def test_the_shipped_registry_and_split_files_load(tmp_path):
    registry = load_registry(CONFIGS / "registry.yaml")
    split = load_split(CONFIGS / "optiml.yaml")
    assert {f"t5_{n}" for n in ("wmt14_ende", "wmt16_enro", "cnn_dailymail")} <= set(registry.tasks)
    per_collection = collections.Counter(benchmark_of(name) for name in registry.tasks)
    # every task of the collections' public task lists (docs/bench.md): CrossFit's 160, PromptSource
    # 0.2.3's 279 (+ MMLU), FLAN 2021's 70, T5's 28 of 36, and the 14 / 21 / 14 the paper counts
    assert per_collection == {
        "crossfit": 160,
        "promptsource": 280,
        "flan": 70,
        "exmix": 14,
        "t5": 28,
        "unifiedskg": 21,
        "reasoning": 14,
    }
    for name, entry in registry.tasks.items():
        assert entry.category in registry.taxonomy, (name, entry.category)  # no typo makes a new cluster
        assert entry.sources, name
        if INSTRUCTION_TYPES[benchmark_of(name)] == "keywords":
            assert entry.instruction, name
    assert registry.canonical_sources(["squad1.1", "multinli", "triviaqa"]) == (
        "squad_v1",
        "mnli",
        "triviaqa",
    )
    listed = set(split.partially_supervised_tasks) | set(split.fully_supervised_tasks) | set(split.dev_tasks)
    assert listed <= set(registry.tasks)  # every non-SNI task the split names has its category
    assert "Textual Entailment" in split.fully_held_out_categories
    assert yaml.safe_load((CONFIGS / "optiml.yaml").read_text())["fully_supervised_instances"] > 0


# one process of one, a small batch: the loader's own settings, not the bench's, are not under test here
LOADER_SETTINGS = {"seed": 0, "batch_size": 4, "seq_len": 128, "process_index": 0, "process_count": 1}


def first_batch(**data):
    loader, _ = build_loaders(DataConfig(**data), ByteTokenizer(), **LOADER_SETTINGS)
    return next(loader)


def test_finetuning_reads_dir_train_with_the_default_fields(built):
    assert first_batch(train=str(built / "train"))["input_ids"].shape == (4, 128)
    # data.fields mapping the task column too: the tasks are the bench's (as they are by file stem)
    fields = {"src": "src", "tgt": "tgt", "task": "task"}
    assert first_batch(train=str(built / "train"), fields=fields)["input_ids"].shape == (4, 128)


def test_evaluation_reads_dir_test(built):
    """optiml-evaluate --data DIR/test: the Parquet shards through the format registry, every reference
    and the options of each row kept."""
    records = pq.read_table(built / "test").to_pylist()
    tasks = {t.name: t for t in load_eval_tasks(built / "test", max_instances=0)}
    assert set(tasks) == {r["task"] for r in records}
    assert len(tasks["flan_rte"].instances) == 10
    got = sorted((t.name, i.input, i.references, i.options) for t in tasks.values() for i in t.instances)
    want = sorted((r["task"], r["src"], tuple(r["references"]), tuple(r["options"])) for r in records)
    assert got == want


def test_a_keyword_task_without_its_instruction_is_one_line(inputs, capsys, tmp_path):
    tasks = {
        **REGISTRY["tasks"],
        "crossfit_ethos": {"category": "Toxic Language Detection", "sources": ["e"]},
    }
    assert run(inputs, registry=write_yaml(tmp_path / "r.yaml", {"tasks": tasks}), output="x") == 2
    assert "task 'crossfit_ethos' (crossfit) has no instruction: add one to" in error_line(capsys)


def test_python_dash_m_is_the_command(tmp_path):
    command = [sys.executable, "-m", "optiml_jax.bench", "build", "--collection", f"sni={tmp_path / 'no'}"]
    done = subprocess.run([*command, "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: --collection sni={tmp_path / 'no'}: no such file or directory"
    ]


def test_the_command_forks_its_workers_without_jax_loaded(inputs):
    """The train pass forks workers sharing the n-gram index; JAX's threads must not be inherited (JAX
    warns that a fork after its import may deadlock), so the build command never imports it."""
    root, collections, registry, split = inputs
    command = [sys.executable, "-m", "optiml_jax.bench", "build", "--quiet", "--workers", "2"]
    for name, path in collections.items():
        command += ["--collection", f"{name}={path}"]
    command += ["--registry", registry, "--split", split, "--output", str(root / "forked")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "fork" not in done.stderr
    assert json.loads((root / "forked" / "manifest.json").read_text())["settings"]["workers"] == 2


def test_the_shipped_registry_and_split_build_the_sni_sample(inputs):
    root, collections = inputs[0], inputs[1]
    argv = ["build", "--quiet", "--workers", "1", "--collection", f"sni={collections['sni']}"]
    assert main([*argv, "--output", str(root / "shipped")]) == 0  # --registry, --split: the shipped files
    manifest = json.loads((root / "shipped" / "manifest.json").read_text())
    assert manifest["settings"]["split"].endswith("configs/bench/optiml.yaml")
    held_out = {
        name: (e["split"], e["level"]) for name, e in manifest["tasks"].items() if e["split"] != "train"
    }
    # the sample's two SNI test-split tasks are of categories the paper holds out whole, Word Analogy
    # in its dev (Table 15), Coreference Resolution in its test (Table 12)
    assert held_out == {
        "task1154_bard_analogical_reasoning_travel": ("dev", "fully_held_out"),  # Word Analogy
        "task1664_winobias_text_generation": ("test", "fully_held_out"),  # Coreference Resolution
    }
    assert sum(e["split"] == "train" for e in manifest["tasks"].values()) == 8


def test_every_registry_task_builds_and_the_suites_find_theirs(tmp_path):
    """A few generated instances of each of the shipped registry's tasks, in every collection's layout
    and under its dump names, built with the shipped split: no task lacks a category or instruction, every
    name the split file gives is found, and every bench task the evaluation suites (configs/eval/) name is
    in the split and at the level they evaluate it at."""
    registry = load_registry(CONFIGS / "registry.yaml")
    collections_ = make_registry_collections(tmp_path / "collections", registry)
    argv = ["build", "--quiet", "--workers", "1", "--output", str(tmp_path / "bench")]
    for name, path in collections_.items():
        argv += ["--collection", f"{name}={path}"]
    assert main(argv) == 0
    tasks = json.loads((tmp_path / "bench" / "manifest.json").read_text())["tasks"]
    assert len(tasks) == len(registry.tasks) + 10  # and the SNI sample's ten
    suites = [yaml.safe_load((SUITES / f"optiml_{n}.yaml").read_text()) for n in ("validation", "test")]
    entries = [e for suite in suites for e in suite["entries"] if e["data"].startswith("$OPTIML_BENCH/")]
    assert len(entries) > 30
    for entry in entries:
        split = entry["data"].rsplit("/", 1)[1]
        held = {n: t for n, t in tasks.items() if t["examples_by_split"][split] > 0}
        if entry["task"] == "promptsource_mmlu":  # no PromptSource release has MMLU templates
            continue
        if "*" in entry["task"]:  # every evaluation task of its category (and collection) is in its split
            of_category = {
                n
                for n, t in tasks.items()
                if category_name(t["category"]) == entry["category"]
                and entry["benchmark"] in ("mixed", t["benchmark"])
                and t["split"] in ("dev", "test")
            }
            assert of_category <= set(held), entry
            assert of_category or entry["benchmark"] == "sni", entry  # the SNI sample has two test tasks
        else:
            assert entry["task"] in held, entry
            assert tasks[entry["task"]]["level"] == entry["level"], entry
