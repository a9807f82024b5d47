"""data.mixture (issue #22): benchmark shares over EPS, extra slices with their own loss, MetaICL
demonstrations, the mixture report; on a small built-bench-like Parquet set generated here."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_tokenizer import ByteTokenizer
from finetune_helpers import run_config
from simulated_processes import as_processes

from optiml_jax.cli.bench import main as bench_main
from optiml_jax.config import ConfigError
from optiml_jax.data import DataConfig, Example, build_loaders, build_train_loader
from optiml_jax.data.demonstrations import (
    DemonstrationsConfig,
    Demonstrator,
    count_probabilities,
    with_demonstrations,
)
from optiml_jax.data.mixture import WholeSequence, share_scalars
from optiml_jax.data.mixture_report import mixture_report
from optiml_jax.data.packing import row_arrays, tokenize_examples
from optiml_jax.train import train_and_evaluate
from optiml_jax.train.metrics_log import read_jsonl

# benchmark -> task sizes: EPS (eps=100) inside each, so "big" tasks are capped
BENCH = {"sni": [10, 300, 60], "promptsource": [500, 40], "flan": [80], "crossfit": [30, 30]}
WEIGHTS = {"promptsource": 45, "flan": 20, "sni": 25, "crossfit": 10}
SLICES = [
    {"name": "reasoning", "path": "reasoning.jsonl", "share": 0.01},
    {"name": "pretraining", "path": "pretraining.txt", "share": 0.05, "loss": "all"},
]


def bench_row(benchmark, task, i):
    if benchmark == "sni":  # task-level instruction: the definition starts every prompt
        src = f"Instructions: do {task}.\n\nInput: {benchmark} {task} item {i}\nA:"
    else:
        src = f"{benchmark} {task} item {i}?"
    return {
        "task": task,
        "benchmark": benchmark,
        "category": "qa",
        "level": "train",
        "src": src,
        "tgt": f"out{i % 7}",
        "references": [f"out{i % 7}"],
        "options": [],
        "template": "t0",
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    (root / "train").mkdir()
    for benchmark, sizes in BENCH.items():
        for t, n in enumerate(sizes):
            task = f"{benchmark}_task{t}"
            rows = [bench_row(benchmark, task, i) for i in range(n)]
            pq.write_table(pa.Table.from_pylist(rows), root / "train" / f"{task}.parquet", row_group_size=64)
    with open(root / "reasoning.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"src": f"Think about {i}.", "tgt": f"since{i}"}) + "\n")
    (root / "pretraining.txt").write_text("".join(f"plain document number {i}\n" for i in range(200)))
    return root


def data_config(root, **extra):
    slices = [{**s, "path": str(root / s["path"])} for s in SLICES]
    values = {"train": str(root / "train"), "eps": 100, "mixture": {"benchmarks": WEIGHTS, "slices": slices}}
    return DataConfig(**{**values, **extra})


def make_loader(root, data=None, **kw):
    args = dict(seed=3, batch_size=4, seq_len=96, process_index=0, process_count=1)
    return build_train_loader(data or data_config(root), ByteTokenizer(), **{**args, **kw})


def test_realised_shares_within_one_point_of_the_targets_over_20000_draws(data):
    loader = make_loader(data)
    stream, plan = loader.mixture, loader.plan
    for _ in range(20000):
        stream.advance()
    counts = loader.mixture_counts()
    rest = 1 - 0.06
    expected = {b: rest * w / 100 for b, w in WEIGHTS.items()} | {"reasoning": 0.01, "pretraining": 0.05}
    assert {name: group.share for name, group in plan.groups.items()} == pytest.approx(expected)
    for name, share in expected.items():
        assert abs(counts[name] / 20000 - share) < 0.01, (name, counts[name] / 20000, share)
    assert share_scalars(counts)["mixture/sni"] == counts["sni"] / 20000


def test_eps_inside_a_benchmark(data):
    loader = make_loader(data)
    stream = loader.mixture
    for _ in range(20000):
        stream.advance()
    counts = stream.task_counts()
    sni = {t: counts[f"sni_task{t}"] for t in range(3)}
    capped = [min(n, 100) for n in BENCH["sni"]]  # 10, 100, 60: the 300-example task is capped
    total = sum(sni.values())
    for t, c in sni.items():
        assert abs(c / total - capped[t] / sum(capped)) < 0.02, (sni, capped)
    assert loader.plan.groups["sni"].capped_tasks == 1


def test_without_a_mixture_the_stream_is_plain_eps(data):
    plain = make_loader(data, data=DataConfig(train=str(data / "train"), eps=100))
    assert plain.plan is None and plain.mixture_counts() == {}
    sizes = [n for sizes in BENCH.values() for n in sizes]
    np.testing.assert_allclose(
        sorted(plain.mixture.probs), sorted(np.minimum(sizes, 100) / sum(np.minimum(sizes, 100)))
    )


def segments(batch, row):
    """(text of the segment's input slots, its loss mask) for every example of a batch row."""
    out = []
    for s in range(1, batch["segment_ids"][row].max() + 1):
        at = batch["segment_ids"][row] == s
        text = bytes(int(b) - 4 for b in batch["input_ids"][row][at]).decode()
        out.append((text, batch["loss_mask"][row][at]))
    return out


def test_whole_sequence_loss_on_loss_all_rows_and_target_only_elsewhere(data):
    loader = make_loader(data, seq_len=160)
    seen = {"whole": 0, "target": 0}
    for _ in range(60):
        batch = next(loader)
        for row in range(4):
            for text, mask in segments(batch, row):
                if text.startswith(" plain document"):  # the pre-training slice: every slot trained on
                    assert mask.all(), text
                    seen["whole"] += 1
                else:  # the prompt is never trained on: loss on the target (and </s>) only
                    # the target is " word" and </s>: the last len(word) + 2 slots predict them
                    trained = len(text) - text.rindex(" ") + 1
                    assert mask[:-trained].sum() == 0 and mask[-trained:].all(), text
                    seen["target"] += 1
    assert seen["whole"] >= 5 and seen["target"] >= 100


def test_plain_text_slices_from_a_text_column(tmp_path, data):
    pq.write_table(pa.table({"text": ["a b c", "d e f g"]}), tmp_path / "pile.parquet")
    slices = [{"name": "pretraining", "path": str(tmp_path / "pile.parquet"), "share": 0.5, "loss": "all"}]
    cfg = DataConfig(train=str(data / "train"), eps=100, mixture={"benchmarks": WEIGHTS, "slices": slices})
    loader = make_loader(data, data=cfg)
    tasks = loader.plan.groups["pretraining"].tasks
    assert tasks == ["pretraining/pile"]
    example = loader.plan.tasks["pretraining/pile"][1]
    assert isinstance(example, WholeSequence) and (example.src, example.tgt) == ("", "d e f g")
    (tokenized,) = tokenize_examples([WholeSequence(Example("t", "Q:", "A", "x:1"))], ByteTokenizer())
    assert tokenized.num_source == 0 and row_arrays([tokenized], 8)["loss_mask"][:4].tolist() == [1, 1, 1, 1]


def test_resume_in_the_middle_of_a_mixed_stream_is_exact_on_any_process_count(data):
    demos = {"a": 2, "max": 3, "loss": "suffix"}
    cfg = data_config(data, demonstrations=demos)
    full = make_loader(data, data=cfg)
    reference = [next(full) for _ in range(12)]
    first = make_loader(data, data=cfg)
    for _ in range(7):
        next(first)
    resumed = make_loader(data, data=cfg, state=first.get_state())
    for want in reference[7:]:
        got = next(resumed)
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)

    def process(p, allgather):
        part = make_loader(data, data=cfg, process_index=p, process_count=2, allgather=allgather)
        return [next(part) for _ in range(3)]

    halves = as_processes(2, process)
    for k in range(3):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][k]["loss_mask"], halves[1][k]["loss_mask"]]), reference[k]["loss_mask"]
        )
    # Another mixture is another stream: its state is refused.
    other = data_config(data)
    with pytest.raises(ValueError, match="different data stream"):
        make_loader(data, data=other, state=first.get_state())


def test_zipf_demonstration_counts_fit_the_distribution():
    cfg = DemonstrationsConfig.from_value({"distribution": "zipf", "a": 4, "max": 5})
    expected = count_probabilities(4.0, 5)
    assert expected[0] == pytest.approx(1 / 1.0823232337, rel=1e-6)  # 1 / zeta(4): 92.4% get none
    demonstrator = Demonstrator(cfg, seed=11)
    n = 20000
    counts = np.bincount([demonstrator.count(i, 1000) for i in range(n)], minlength=6)
    # Pearson's chi-square, the sparse tail (k >= 2) pooled: 2 degrees of freedom, p = 0.001 at 13.8
    observed = np.array([counts[0], counts[1], counts[2:].sum()])
    wanted = n * np.array([expected[0], expected[1], expected[2:].sum()])
    assert ((observed - wanted) ** 2 / wanted).sum() < 13.8, (counts, wanted)


def test_demonstrations_go_after_the_definition_or_before_the_example():
    cfg = DemonstrationsConfig(separator="\n\n\n", loss="suffix")
    task_level = [Example("t", f"Instructions: Add.\n\nInput: {i}\nA:", f"{i + 1}", "f:1") for i in range(3)]
    shown = with_demonstrations(task_level[0], task_level[1:], cfg)
    assert shown.src == "Instructions: Add.\n\nInput: 1\nA: 2\n\n\nInput: 2\nA: 3\n\n\nInput: 0\nA:"
    instance = [Example("t", f"What is {i}?", f"{i}", "f:1") for i in range(2)]
    assert with_demonstrations(instance[0], instance[1:], cfg).src == "What is 1? 1\n\n\nWhat is 0?"
    # loss: suffix trains on the demonstrations' outputs too; target on the example's target only
    (suffix,) = tokenize_examples([shown], ByteTokenizer())
    mask = row_arrays([suffix], 80)["loss_mask"]
    trained = bytes(t - 4 for t, m in zip(suffix.tokens[1:], mask) if m and t > 3).decode()
    assert trained == " 2 3 1"
    plain = with_demonstrations(task_level[0], task_level[1:], DemonstrationsConfig())
    (target,) = tokenize_examples([plain], ByteTokenizer())
    assert row_arrays([target], 80)["loss_mask"].sum() == 3  # " 1" and </s>


@pytest.mark.parametrize(
    "mixture, message",
    [
        ({"benchmarks": {"sni": -1}}, r"^data: data.mixture.benchmarks.sni=-1 is negative"),
        (
            {"slices": [{"name": "r", "path": "x", "share": -0.1}]},
            r"^data: data.mixture.slices\[0\].share=-0.1",
        ),
        (
            {"slices": [{"name": "a", "path": "x", "share": 0.7}, {"name": "b", "path": "y", "share": 0.6}]},
            r"^data: data.mixture.slices: the shares add up to 1.3, over 1 in total$",
        ),
        ({"benchmarks": {"sni": 1}, "slices": [{"name": "sni", "share": 0.1}]}, "used twice"),
        ({"sizes": 1}, r"unknown key 'sizes'"),
    ],
)
def test_a_bad_share_is_one_clear_error_line(mixture, message):
    with pytest.raises(ConfigError, match=message) as error:
        DataConfig.from_dict({"train": "x", "mixture": mixture})
    assert "\n" not in str(error.value)


def test_an_unknown_benchmark_or_an_unweighted_one_names_the_key(data):
    with pytest.raises(
        ConfigError, match=r"^data.mixture.benchmarks.exmix: data.train has no task of benchmark"
    ):
        make_loader(
            data, data=DataConfig(train=str(data / "train"), mixture={"benchmarks": {**WEIGHTS, "exmix": 2}})
        )
    with pytest.raises(ConfigError, match=r"benchmark 'crossfit' with no weight; give it one \(0 leaves"):
        make_loader(
            data,
            data=DataConfig(
                train=str(data / "train"), mixture={"benchmarks": {"sni": 1, "flan": 1, "promptsource": 1}}
            ),
        )
    weights = {**WEIGHTS, "crossfit": 0}  # 0: its tasks are left out
    loader = make_loader(data, data=DataConfig(train=str(data / "train"), mixture={"benchmarks": weights}))
    assert "crossfit" not in loader.plan.groups and "crossfit_task0" not in loader.mixture.names


def test_jsonl_benchmark_mapped_through_fields(tmp_path):
    with open(tmp_path / "mixed.jsonl", "w") as f:
        for i in range(60):
            f.write(
                json.dumps({"q": f"q{i}", "a": "y", "name": f"t{i % 3}", "coll": "flan" if i % 3 else "sni"})
                + "\n"
            )
    cfg = DataConfig(
        train=str(tmp_path / "mixed.jsonl"),
        fields={"src": "q", "tgt": "a", "task": "name", "benchmark": "coll"},
        mixture={"benchmarks": {"sni": 1, "flan": 3}},
    )
    with open(tmp_path / "eval.jsonl", "w") as f:  # evaluation data needs no benchmark
        f.write(json.dumps({"q": "q", "a": "a", "name": "t0"}) + "\n")
    cfg = dataclasses.replace(cfg, eval=str(tmp_path / "eval.jsonl"))
    loader, evaluation = build_loaders(
        cfg, ByteTokenizer(), seed=0, batch_size=2, seq_len=32, process_index=0, process_count=1
    )
    assert evaluation.num_examples == 1
    assert loader.plan.groups["sni"].tasks == ["t0"] and loader.plan.groups["flan"].tasks == ["t1", "t2"]
    assert loader.plan.groups["flan"].share == pytest.approx(0.75)


def test_mixture_report_shape_and_cli(data, tmp_path, monkeypatch):
    cfg = SimpleNamespace(
        data=data_config(data, demonstrations={"a": 2}), seed=0, train=SimpleNamespace(seq_len=96)
    )
    report = mixture_report(cfg, ByteTokenizer(), 3000)
    assert set(report) == {"benchmarks", "slices", "demonstrations_per_example"}
    assert set(report["benchmarks"]) == set(WEIGHTS) and set(report["slices"]) == {"reasoning", "pretraining"}
    keys = {"target_share", "realised_share", "realised_token_share", "tasks", "capped_tasks"}
    rows = [*report["benchmarks"].values(), *report["slices"].values()]
    assert all(set(row) == keys for row in rows)
    assert sum(r["realised_share"] for r in rows) == pytest.approx(1) and sum(
        r["realised_token_share"] for r in rows
    ) == pytest.approx(1)
    assert report["slices"]["pretraining"]["target_share"] == 0.05
    assert report["benchmarks"]["promptsource"]["capped_tasks"] == 1
    # Zipf(2) capped at 5 has mean 1.05; the pre-training slice (5%) gets none
    mean = (count_probabilities(2.0, 5) * np.arange(6)).sum() * 0.95
    assert report["demonstrations_per_example"] == pytest.approx(mean, abs=0.12)
    # Bad input from the CLI: one line, exit 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data:\n  train: {data / 'train'}\n  mixture:\n    benchmarks: {{sni: -2}}\n")
    assert (
        bench_main(
            ["mix-report", "--config", str(bad), "--examples", "10", "--json", str(tmp_path / "r.json")]
        )
        == 2
    )


def test_mix_report_cli_writes_the_report(data, tmp_path, capsys):
    out = tmp_path / "mix.json"
    slices = json.dumps([{**SLICES[1], "path": str(data / SLICES[1]["path"])}])
    argv = [
        "--config",
        "demo",
        f"data.train={data / 'train'}",
        "data.eval_holdout=null",
        "eval.tasks=null",
        f"data.mixture={json.dumps({'benchmarks': WEIGHTS, 'slices': json.loads(slices)})}",
        "--examples",
        "500",
        "--json",
        str(out),
    ]
    assert bench_main(["mix-report", *argv]) == 0  # as `optiml-bench mix-report` runs it
    report = json.loads(out.read_text())
    assert set(report["slices"]) == {"pretraining"} and report["demonstrations_per_example"] == 0
    assert "pretraining" in capsys.readouterr().out


@pytest.mark.slow  # a 4-step fine-tune of a tiny model: about a minute on 2 CPU cores, compiles included
def test_fine_tuning_logs_the_realised_shares(data, tiny_preset, tmp_path):
    mixture = {"benchmarks": WEIGHTS, "slices": [{**SLICES[1], "path": str(data / SLICES[1]["path"])}]}
    cfg = run_config(
        tiny_preset, tmp_path, data={"train": str(data / "train"), "eps": 100, "mixture": mixture}
    )
    train_and_evaluate(cfg, progress=False)
    logged = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/step_loss" in r]
    assert len(logged) == 4
    for record in logged:
        shares = {k: v for k, v in record.items() if k.startswith("mixture/")}
        assert set(shares) == {f"mixture/{b}" for b in WEIGHTS} | {"mixture/pretraining"}
        assert sum(shares.values()) == pytest.approx(1)
