"""OPT-IML Bench builds (optiml_jax/bench) on small generated collections in every layout plus the SNI
sample (bench_fixtures.py): each rule of the spec acts on what was planted for it, and the same seed
gives the same bench."""

import json
import os
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bench_fixtures import REGISTRY, SNI_SAMPLE, SPLIT, make_collections, rte_inputs, write_yaml

from optiml_jax.bench import BenchSettings, build_bench
from optiml_jax.bench import build as build_module
from optiml_jax.bench.collections import crossfit, flan, sni
from optiml_jax.bench.output import SCHEMA
from optiml_jax.bench.registry import load_registry
from optiml_jax.bench.tasks import BenchError
from optiml_jax.data.templates import ANSWER_DELIMITERS

# The suite's process has JAX loaded by other tests, so JAX warns at the build's fork; the workers never
# touch JAX, and the command itself forks without JAX loaded (test_bench_cli checks it).
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def build(tmp, name, registry=REGISTRY, split=SPLIT, **settings):
    collections = make_collections(tmp / f"{name}-collections")
    result = build_bench(
        collections,
        write_yaml(tmp / f"{name}-registry.yaml", registry),
        write_yaml(tmp / f"{name}-split.yaml", split),
        tmp / name,
        BenchSettings(**{"workers": 2, **settings}),
        progress=False,
    )
    return tmp / name, result


def rows(directory, split, task=None):
    table = (
        pq.read_table(directory / split, schema=SCHEMA).to_pylist() if (directory / split).exists() else []
    )
    return [r for r in table if task is None or r["task"] == task]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build(tmp_path_factory.mktemp("bench"), "out")


def test_output_files_and_columns(bench):
    directory, result = bench
    assert sorted(p.name for p in directory.iterdir()) == [
        "dev",
        "manifest.json",
        "overlap.json",
        "report.md",
        "test",
        "train",
    ]
    assert pq.read_schema(next((directory / "train").glob("*.parquet"))).names == SCHEMA.names
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest == result.manifest
    assert set(manifest["tasks"]["flan_rte"]) >= {
        "benchmark",
        "category",
        "sources",
        "split",
        "level",
        "examples",
        "removed_reason",
    }
    assert not list(directory.parent.glob(".out.tmp-*"))  # written atomically


def test_shared_sources_remove_tasks_with_their_reason(bench):
    directory, result = bench
    tasks = result.manifest["tasks"]
    # consolidation: a CrossFit task whose source another collection has ("COPA" ~ "copa")
    assert tasks["crossfit_copa"]["split"] == "removed"
    assert "'COPA' is also in promptsource" in tasks["crossfit_copa"]["removed_reason"]
    assert tasks["crossfit_ethos"]["split"] == "train"  # its source is its own
    # de-duplication (a): a train task sharing a source with a held-out evaluation task
    assert tasks["unifiedskg_dart"]["split"] == "removed"
    assert "evaluation task 'flan_rte'" in tasks["unifiedskg_dart"]["removed_reason"]
    assert not rows(directory, "train", "unifiedskg_dart") and not rows(directory, "train", "crossfit_copa")


def test_planted_13gram_overlap_is_found_at_its_fraction_and_an_unrelated_pair_is_not(bench):
    directory, result = bench
    overlap = json.loads((directory / "overlap.json").read_text())
    assert overlap == [{"train_task": "exmix_rte_copy", "eval_task": "flan_rte", "fraction": 0.3}]
    assert "| exmix_rte_copy | flan_rte | 0.300 |" in (directory / "report.md").read_text()
    # default --drop-overlapping none: reported, kept
    assert result.manifest["tasks"]["exmix_rte_copy"]["split"] == "train"


def test_drop_overlapping_train_removes_the_train_task_of_each_pair(tmp_path):
    directory, result = build(tmp_path, "dropped", drop_overlapping="train")
    entry = result.manifest["tasks"]["exmix_rte_copy"]
    assert entry["split"] == "removed" and "30.0% of 'flan_rte'" in entry["removed_reason"]
    assert not rows(directory, "train", "exmix_rte_copy")
    assert result.manifest["tasks"]["exmix_unrelated"]["split"] == "train"


def test_levels_and_splits(bench):
    directory, result = bench
    tasks = result.manifest["tasks"]
    expect = [  # (task, split, level)
        ("task833_poem_sentiment_classification", "test", "fully_held_out"),  # its category is held out
        ("flan_rte", "test", "fully_held_out"),
        ("task1564_triviaqa_answer_generation", "test", "partially_supervised"),
        ("promptsource_jigsaw_toxic", "dev", "partially_supervised"),
        ("flan_squad_v1", "train", "fully_supervised"),
        ("task1146_country_capital", "train", "fully_supervised"),
        ("task751_svamp_subtraction_question_answering", "train", "train"),
    ]
    assert [(name, tasks[name]["split"], tasks[name]["level"]) for name, _, _ in expect] == expect
    assert {r["level"] for r in rows(directory, "test", "flan_rte")} == {"fully_held_out"}
    # fully supervised: the last 20 instances evaluated (dev or test as dev_tasks says), never trained on
    capital = json.loads((SNI_SAMPLE / "task1146_country_capital.json").read_text())["Instances"]
    held = rows(directory, "test", "task1146_country_capital")
    assert [r["references"] for r in held] == [i["output"] for i in capital[-20:]]
    assert {r["level"] for r in held} == {"fully_supervised"}
    trained = rows(directory, "train", "task1146_country_capital")
    assert len(trained) == 180 and not {r["src"] for r in trained} & {r["src"] for r in held}
    assert (
        len(rows(directory, "dev", "flan_squad_v1")) == 20
        and len(rows(directory, "train", "flan_squad_v1")) == 40
    )


def test_dropped_templates_and_one_template_per_instance(bench):
    directory, result = bench
    copa = rows(directory, "train", "promptsource_super_glue_copa")
    assert len(copa) == 40  # N instances -> N prompts, whatever the number of templates
    assert {r["template"] for r in copa} == {"best_option", "cause_effect"}  # generate_question dropped
    assert result.manifest["tasks"]["promptsource_super_glue_copa"]["dropped_prompts"] == 40
    # FLAN's rows keep their own template; the few-shot rows are not read
    assert {r["template"] for r in rows(directory, "test", "flan_rte")} == {
        "zs_opt:0",
        "zs_opt:1",
        "zs_opt:2",
    }


def test_prompts_delimiters_references_and_options(bench):
    directory, _ = bench
    train = rows(directory, "train")
    used = {d for r in train for d in ANSWER_DELIMITERS if r["src"].endswith(d)}
    assert len(used) >= 6  # drawn per example from the paper's eight
    assert all(r["src"].endswith(":") for r in train)
    ethos = rows(directory, "train", "crossfit_ethos")  # answers joined by a tab
    assert ethos[0]["src"].startswith("Hate?\n\n") and ethos[0]["references"] == ["ans0", "alt0"]
    assert ethos[0]["tgt"] == "ans0"
    assert all("kshot" not in r["src"] for r in ethos)  # the whole dataset read, not its k-shot sample
    gsm = rows(directory, "train", "reasoning_gsm8k")[0]
    assert gsm["src"].startswith("Instructions: Solve:\n\nInput: 0 + 1 = ?")
    jigsaw = rows(directory, "dev", "promptsource_jigsaw_toxic")
    assert len(jigsaw) == 40 and all(r["options"] == ["yes", "no"] for r in jigsaw)
    assert [r["tgt"] for r in jigsaw[:2]] == ["no", "yes"]  # the correct choice of each instance
    rte = rows(directory, "test", "flan_rte")  # FLAN's OPTIONS block, the target among them
    assert [r["options"] for r in rte[:2]] == [["yes0", "no0"], ["yes1", "no1"]]
    assert all(r["options"] == [] for r in rows(directory, "train", "flan_squad_v1"))
    trivia = rows(directory, "test", "task1564_triviaqa_answer_generation")
    assert max(len(r["references"]) for r in trivia) > 1  # every reference of an SNI instance


def test_caps_draw_at_random_per_seed_and_flan_has_its_own(tmp_path):
    first, result = build(tmp_path, "a", max_per_task=15, max_per_task_flan=5, max_dev_per_task=7)
    counts = {n: e["examples_by_split"] for n, e in result.manifest["tasks"].items()}
    assert counts["task751_svamp_subtraction_question_answering"]["train"] == 15
    assert counts["flan_squad_v1"] == {"train": 5, "dev": 5, "test": 0}  # FLAN cap, then the dev cap
    assert counts["promptsource_jigsaw_toxic"]["dev"] == 7
    svamp = [r["src"] for r in rows(first, "train", "task751_svamp_subtraction_question_answering")]
    again, _ = build(tmp_path, "b", max_per_task=15, max_per_task_flan=5, max_dev_per_task=7)
    other, _ = build(tmp_path, "c", max_per_task=15, max_per_task_flan=5, max_dev_per_task=7, seed=1)
    assert [r["src"] for r in rows(again, "train", "task751_svamp_subtraction_question_answering")] == svamp
    assert [r["src"] for r in rows(other, "train", "task751_svamp_subtraction_question_answering")] != svamp


def test_the_same_seed_gives_the_same_bench(bench, tmp_path):
    directory, result = bench
    again, second = build(tmp_path, "again", workers=1)  # and the worker count does not matter
    for split in ("train", "dev", "test"):
        for shard in sorted((directory / split).glob("*.parquet")):
            assert pq.read_table(shard).equals(pq.read_table(again / split / shard.name)), shard
    assert second.overlap == result.overlap
    assert {n: e["examples"] for n, e in second.manifest["tasks"].items()} == {
        n: e["examples"] for n, e in result.manifest["tasks"].items()
    }
    assert rte_inputs()[0] in rows(again, "test", "flan_rte")[0]["src"]


def test_a_parquet_collection_read_through_the_registry_column_mapping(tmp_path):
    rows = [{"name": f"t{i % 2}", "q": f"question {i}", "a": [f"a{i}", f"b{i}"]} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "exmix.parquet", row_group_size=2)
    registry = {
        "collections": {"exmix": {"columns": {"task": "name", "input": "q", "output": "a"}}},
        "tasks": {
            f"exmix_t{i}": {"category": "Misc.", "sources": [f"s{i}"], "instruction": "Go."} for i in (0, 1)
        },
    }
    split = {"partially_supervised_tasks": ["exmix_t1"]}
    result = build_bench(
        {"exmix": str(tmp_path / "exmix.parquet")},
        write_yaml(tmp_path / "r.yaml", registry),
        write_yaml(tmp_path / "s.yaml", split),
        tmp_path / "out",
        BenchSettings(workers=1),
        progress=False,
    )
    assert result.manifest["tasks"]["exmix_t0"]["examples"] == 3
    test = pq.read_table(tmp_path / "out" / "test").to_pylist()
    assert [r["references"] for r in test] == [["a1", "b1"], ["a3", "b3"], ["a5", "b5"]]
    assert test[0]["src"].startswith("Go.\n\nquestion 1")


@pytest.mark.parametrize(
    "train_source, aliases, removed",
    [
        ("Trivia QA", {}, True),  # case, spaces and underscores do not make another source
        ("squad1.1", {}, False),  # another spelling of the same dataset...
        ("squad1.1", {"squad_v1": ["SQuAD 1.1"]}, True),  # ...is one source once the registry says so
    ],
)
def test_one_data_source_spelled_two_ways(tmp_path, train_source, aliases, removed):
    rows = [{"name": f"t{i % 2}", "q": f"question {i}", "a": f"a{i}"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "exmix.parquet")
    eval_source = "triviaqa" if train_source == "Trivia QA" else "squad_v1"
    registry = {
        "collections": {"exmix": {"columns": {"task": "name", "input": "q", "output": "a"}}},
        "source_aliases": aliases,
        "tasks": {
            "exmix_t0": {"category": "Misc.", "sources": [train_source], "instruction": "Go."},
            "exmix_t1": {"category": "Misc.", "sources": [eval_source], "instruction": "Go."},
        },
    }
    result = build_bench(
        {"exmix": str(tmp_path / "exmix.parquet")},
        write_yaml(tmp_path / "r.yaml", registry),
        write_yaml(tmp_path / "s.yaml", {"partially_supervised_tasks": ["exmix_t1"]}),
        tmp_path / "out",
        BenchSettings(workers=1),
        progress=False,
    )
    train = result.manifest["tasks"]["exmix_t0"]
    assert (train["split"] == "removed") == removed
    if aliases:  # the manifest and the reason name the canonical id
        assert train["sources"] == ["squad_v1"]
        assert "shares data source 'squad_v1' with evaluation task 'exmix_t1'" in train["removed_reason"]


def test_an_alias_of_two_sources_is_one_line(tmp_path):
    registry = {"source_aliases": {"squad_v1": ["squad1.1"], "squad_v2": ["SQuAD 1.1"]}}
    with pytest.raises(BenchError, match=r"source_aliases: 'SQuAD 1.1' is an alias of both 'squad_v1' and"):
        load_registry(write_yaml(tmp_path / "r.yaml", registry))


def test_crossfit_files_as_its_scripts_name_them(tmp_path):
    """`{task}_{split}.tsv`, `{task}_full_{seed}_{split}.tsv` (preferred) and `{task}_{k}_{seed}_{split}.tsv`
    (the largest k, lowest seed, when nothing else); answers joined by ` [SEP] ` or tabs."""
    files = {
        "dbpedia_14/dbpedia_14_16_100_train.tsv": "a\tx\n",
        "dbpedia_14/dbpedia_14_32_13_train.tsv": "b\tx\n",
        "dbpedia_14/dbpedia_14_32_21_train.tsv": "c\tx\n",
        "yelp_review_full/yelp_review_full_full_100_test.tsv": "full test\tone [SEP] two\n",
        "yelp_review_full/yelp_review_full_full_100_train.tsv": "full train\tone\tthree\n",
        "yelp_review_full/yelp_review_full_train.tsv": "plain\tx\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    tasks = {t.name: t.load() for t in crossfit.read(tmp_path, {})}
    assert [i[0].input for i in tasks["crossfit_dbpedia_14"]] == ["b"]
    yelp = tasks["crossfit_yelp_review_full"]
    assert [(i[0].input, i[0].references) for i in yelp] == [
        ("full train", ("one", "three")),
        ("full test", ("one", "two")),
    ]


@pytest.mark.parametrize(
    "prompt, target, options",
    [
        ("P\n\nOPTIONS:\n- yes\n- no", "yes", ("yes", "no")),
        ("- a\n- b\nQ?\nChoose from:\n- x\n- y\n- z\nA:", "z", ("x", "y", "z")),  # the last block
        ("P\n\nOPTIONS:\n- yes\n- no", "maybe", ()),  # the target is not an option: not a choice list
        ("- only one\nQ?", "only one", ()),
    ],
)
def test_flan_options_are_the_prompts_last_dash_list(prompt, target, options):
    assert flan.listed_options(prompt, target) == options


@pytest.mark.parametrize(
    "task",
    [
        {
            "Source": ["s"],
            "Categories": ["Misc."],
            "Definition": ['Copy the "Instances": no'],
            "Instances": [],
        },
        {"Source": ["s"], "Definition": ["Copy."], "Instances": [], "Categories": ["Misc."]},  # after them
        {"Source": ["s"], "Categories": ["Misc."], "Definition": ["Copy."], "Instances": []},
    ],
)
def test_an_sni_header_is_read_before_its_instances_or_whole(tmp_path, task):
    task["Instances"] = [{"id": f"i{i}", "input": f"in {i}", "output": [f"out {i}"]} for i in range(3)]
    (tmp_path / "task001_copy.json").write_text(json.dumps(task))
    (read,) = sni.read(tmp_path, {})
    assert (read.category, read.sources, read.definition) == ("Misc.", ("s",), task["Definition"][0])
    assert [i[0].references for i in read.load()] == [("out 0",), ("out 1",), ("out 2",)]


_TRAIN_TASK = build_module._train_task


def _dies_on_the_third(i):
    """A train-pass task that kills its worker on the third task (module-level: the executor pickles it
    by name, and the forked workers have this module)."""
    if i == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return _TRAIN_TASK(i)


def test_a_killed_worker_fails_the_build_with_nothing_written(tmp_path, monkeypatch):
    """The OOM killer taking a worker: the build stops (a Pool would wait for its task forever)."""
    monkeypatch.setattr(build_module, "_train_task", _dies_on_the_third)
    with pytest.raises(build_module.WorkerDied, match="worker process of the train pass died"):
        build(tmp_path, "killed")
    assert not (tmp_path / "killed").exists() and not list(tmp_path.glob(".killed.tmp-*"))


def test_dropping_a_fully_supervised_task_drops_the_pairs_against_its_held_out_rows(tmp_path):
    """fs overlaps the held-out `ev`, so it goes, and its held-out rows with it: `other`, which overlapped
    only those rows, stays, and its pair is no longer reported; eval_examples count what is written."""
    levels = {"ev": "fully_held_out", "fs": "fully_supervised", "other": "train"}
    info = {
        name: {"level": level, "split": "test" if level == "fully_held_out" else "train"}
        for name, level in levels.items()
    }
    for entry in info.values():
        entry["examples_by_split"] = {"train": 5, "dev": 0, "test": 2}
    overlap = [
        {"train_task": "other", "eval_task": "fs", "fraction": 0.5},
        {"train_task": "fs", "eval_task": "ev", "fraction": 0.2},
    ]
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "fs.parquet").write_text("x")
    standing = build_module._drop_overlapping(overlap, info, tmp_path)
    assert standing == [overlap[1]]
    assert info["fs"]["split"] == "removed" and info["other"]["split"] == "train"
    assert not list(tmp_path.glob("*/fs.parquet"))
