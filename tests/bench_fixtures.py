"""Small collections in every public layout of OPT-IML Bench's sources (spec §2), generated (no
collection's data is copied), plus the registry and split files that go with them, for
tests/test_bench_*.py. Planted on purpose:

- crossfit_copa shares the data source `copa` with PromptSource's COPA: removed by consolidation;
- exmix_rte_copy holds 3 of flan_rte's 10 held-out inputs verbatim: a 13-gram overlap of 0.3;
- unifiedskg_dart shares `rte_source` with the held-out flan_rte: removed by de-duplication (a);
- PromptSource COPA has a template that changes the task (question generation), dropped by the registry.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

SNI_SAMPLE = Path(__file__).resolve().parents[1] / "optiml_jax" / "assets" / "data" / "sni"


def words(tag: str, n: int, seed: int) -> str:
    rng = random.Random(f"{tag}:{seed}")
    return " ".join(f"{tag}{rng.randrange(10**6)}" for _ in range(n))


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def rte_inputs(n=10) -> list[str]:
    return [words("rte", 20, i) for i in range(n)]


def make_collections(root: Path, per_task: int = 40) -> dict[str, str]:
    root = Path(root)
    paths = {"sni": str(SNI_SAMPLE)}
    # P3: one subset per (dataset, template); COPA with two templates, one that changes the task, and a
    # rank-classification subset (one row per choice)
    p3 = root / "p3"
    for template in ("best_option", "cause_effect", "generate_question"):
        _jsonl(
            p3 / f"super_glue_copa_{template}" / "train.jsonl",
            [
                {"inputs_pretokenized": f"{template}: {words('copa', 8, i)}", "targets_pretokenized": f"c{i}"}
                for i in range(per_task)
            ],
        )
    rows = []
    for i in range(per_task):
        for choice in ("yes", "no"):
            rows.append(
                {
                    "inputs_pretokenized": f"Is it toxic? {words('jig', 8, i)}",
                    "targets_pretokenized": choice,
                    "answer_choices": ["yes", "no"],
                    "is_correct": choice == ("yes" if i % 2 else "no"),
                }
            )
    (p3 / "jigsaw_toxic_score_eval").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), p3 / "jigsaw_toxic_score_eval" / "train.parquet")
    paths["promptsource"] = str(p3)
    # FLAN collection dump: zero-shot and few-shot rows of several tasks in one Parquet file
    flan = []
    for task, inputs in (
        ("rte:1.0.0", rte_inputs()),
        ("squad_v1:2.0.0", [words("sq", 10, i) for i in range(60)]),
    ):
        for i, text in enumerate(inputs):
            for kind in ("zs_opt", "fs_opt"):
                options = f"\n\nOPTIONS:\n- yes{i}\n- no{i}" if task.startswith("rte") else ""
                flan.append(
                    {
                        "inputs": f"Premise: {text}{options}",
                        "targets": f"yes{i}",
                        "task": task,
                        "_template_type": kind,
                        "_template_idx": i % 3,
                        "_task_source": "Flan2021",
                    }
                )
    (root / "flan").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(flan), root / "flan" / "flan_collection.parquet")
    paths["flan"] = str(root / "flan")
    # CrossFit: one TSV per task and split, as its scripts name them: plain (copa) or the whole dataset
    # (ethos, `_full_{seed}`) beside a k-shot sample of it (`_{k}_{seed}`, not read); answers joined by
    # ` [SEP] ` or by tabs
    for task, prefix, stem, joiner in (
        ("copa", "cf", "copa", " [SEP] "),
        ("ethos", "eth", "ethos_full_100", "\t"),
    ):
        (root / "crossfit" / task).mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            lines = [f"{words(prefix, 10, i)}\tans{i}{joiner}alt{i}\n" for i in range(per_task // 2)]
            (root / "crossfit" / task / f"{stem}_{split}.tsv").write_text("".join(lines), encoding="utf-8")
            if task == "ethos":
                sample = f"{words('kshot', 10, 0)}\tsampled\n"
                (root / "crossfit" / task / f"ethos_16_100_{split}.tsv").write_text(sample, encoding="utf-8")
    paths["crossfit"] = str(root / "crossfit")
    # ExMix: Parquet/JSONL inputs/targets; one task copies 3 of flan_rte's 10 inputs, one is unrelated
    copy = [{"inputs": text, "targets": "copied"} for text in rte_inputs()[:3]]
    copy += [{"inputs": words("ex", 20, i), "targets": "x"} for i in range(per_task)]
    _jsonl(root / "exmix" / "rte_copy.jsonl", copy)
    _jsonl(
        root / "exmix" / "unrelated.jsonl",
        [{"inputs": words("un", 20, i), "targets": "u"} for i in range(per_task)],
    )
    paths["exmix"] = str(root / "exmix")
    # T5 (seqio dumps)
    _jsonl(
        root / "t5" / "wmt16_enro_train.jsonl",
        [{"inputs": words("ro", 6, i), "targets": words("en", 6, i)} for i in range(per_task)],
    )
    paths["t5"] = str(root / "t5")
    # UnifiedSKG seq2seq JSON
    (root / "skg").mkdir()
    (root / "skg" / "dart_train.json").write_text(
        json.dumps(
            [
                {"text_in": f"describe {i}", "struct_in": f"| a | b{i} |", "seq_out": f"out{i}"}
                for i in range(per_task)
            ]
        )
    )
    paths["unifiedskg"] = str(root / "skg")
    _jsonl(
        root / "reasoning" / "gsm8k.jsonl",
        [{"input": f"{i} + 1 = ?", "output": f"so {i + 1}"} for i in range(per_task)],
    )
    paths["reasoning"] = str(root / "reasoning")
    return paths


REGISTRY = {
    "tasks": {
        "promptsource_super_glue_copa": {
            "category": "Cause Effect Classification",
            "sources": ["copa"],
            "drop_templates": ["generate_question"],
        },
        "promptsource_jigsaw_toxic": {"category": "Toxic Language Detection", "sources": ["jigsaw"]},
        "flan_rte": {"category": "Textual Entailment", "sources": ["rte_source"]},
        "flan_squad_v1": {"category": "Question Answering", "sources": ["squad_v1"]},
        "crossfit_copa": {
            "category": "Cause Effect Classification",
            "sources": ["COPA"],
            "instruction": "Pick.",
        },
        "crossfit_ethos": {
            "category": "Toxic Language Detection",
            "sources": ["ethos"],
            "instruction": "Hate?",
        },
        "exmix_rte_copy": {"category": "Misc.", "sources": ["copied"], "instruction": "Repeat."},
        "exmix_unrelated": {"category": "Misc.", "sources": ["unrelated"], "instruction": "Do it."},
        "t5_wmt16_enro": {"category": "Translation", "sources": ["wmt16_enro"], "instruction": "Translate."},
        "unifiedskg_dart": {
            "category": "Data to Text",
            "sources": ["dart", "RTE source"],
            "instruction": "Describe the table",
        },
        "reasoning_gsm8k": {"category": "Reasoning", "sources": ["gsm8k"], "instruction": "Solve:"},
    }
}
SPLIT = {
    "fully_held_out_categories": ["Textual Entailment", "Sentiment Analysis"],
    "partially_supervised_tasks": ["task1564_triviaqa_answer_generation", "promptsource_jigsaw_toxic"],
    "fully_supervised_tasks": ["flan_squad_v1", "task1146_country_capital"],
    "fully_supervised_instances": 20,
    "dev_tasks": ["promptsource_jigsaw_toxic", "flan_squad_v1"],
}


def write_yaml(path: Path, value) -> str:
    Path(path).write_text(yaml.safe_dump(value, sort_keys=False), encoding="utf-8")
    return str(path)


def make_registry_collections(root: Path, registry, per_task: int = 4) -> dict[str, str]:
    """A few generated instances of every task a registry lists, each collection in its public layout
    under the names its dumps use (P3 subsets `{task}_{template}`, FLAN rows `task`, CrossFit
    `{task}_full_{seed}_{split}.tsv`, one file per task elsewhere), plus the SNI sample."""
    root = Path(root)
    local = {}
    for name in registry.tasks:
        benchmark = name.split("_", 1)[0]
        local.setdefault(benchmark, []).append(name[len(benchmark) + 1 :])

    def text(task, i):
        return words(f"{task[:12]}-", 16, i)

    flan = []
    for task in local["flan"]:
        for i in range(per_task):
            row = {
                "inputs": text(task, i),
                "targets": f"t{i}",
                "_template_type": "zs_opt",
                "_template_idx": 0,
            }
            flan.append({**row, "task": f"{task}:1.0.0"})
    (root / "flan").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(flan), root / "flan" / "flan.parquet")
    for task in local["promptsource"]:
        for template in ("first", "second"):
            rows = [
                {"inputs_pretokenized": text(task, i), "targets_pretokenized": f"t{i}"}
                for i in range(per_task)
            ]
            _jsonl(root / "p3" / f"{task}_{template}" / "train.jsonl", rows)
    for task in local["crossfit"]:
        for split in ("train", "test"):
            lines = "".join(f"{text(task, i)}\tt{i}\n" for i in range(per_task // 2))
            (root / "crossfit" / task).mkdir(parents=True, exist_ok=True)
            (root / "crossfit" / task / f"{task}_full_100_{split}.tsv").write_text(lines, encoding="utf-8")
    for benchmark in ("exmix", "t5"):
        for task in local[benchmark]:
            rows = [{"inputs": text(task, i), "targets": f"t{i}"} for i in range(per_task)]
            _jsonl(root / benchmark / f"{task}.jsonl", rows)
    for task in local["unifiedskg"]:
        rows = [{"text_in": text(task, i), "struct_in": "| a |", "seq_out": f"t{i}"} for i in range(per_task)]
        _jsonl(root / "unifiedskg" / f"{task}_train.jsonl", rows)
    for task in local["reasoning"]:
        _jsonl(
            root / "reasoning" / f"{task}.jsonl",
            [{"input": text(task, i), "output": f"t{i}"} for i in range(per_task)],
        )
    folders = {"promptsource": "p3"}
    return {"sni": str(SNI_SAMPLE), **{b: str(root / folders.get(b, b)) for b in local}}
