"""data.eval_holdout: held-out instances of the training tasks ("fully supervised" evaluation). The split
is deterministic and disjoint, the train loader excludes exactly the held-out examples, and a loader
state saved under one hold-out is refused under another."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_tokenizer import ByteTokenizer
from finetune_helpers import SNI_TRAIN_SPLIT

from optiml_jax.config import ConfigError
from optiml_jax.data import (
    DataConfig,
    DataError,
    Example,
    SkipStats,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
    read_tasks,
    split_holdout,
)
from optiml_jax.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
SNI = ROOT / "optiml_jax" / "assets" / "data" / "sni"
EXPLICIT = dict(process_index=0, process_count=1)


def run_cfg(seed=1234, **data):
    return SimpleNamespace(
        data=DataConfig(**data), seed=seed, train=SimpleNamespace(batch_size=4, seq_len=256)
    )


def tasks_of_sizes(*sizes):
    return {
        f"t{t}": [Example(f"t{t}", f"q{t}.{i}", "a", f"t{t}:{i + 1}") for i in range(n)]
        for t, n in enumerate(sizes)
    }


def test_split_takes_the_last_examples_of_every_task_in_order():
    tasks = tasks_of_sizes(3, 40, 200)
    train, held = split_holdout(tasks, 2)
    for name, examples in tasks.items():
        assert train[name] == examples[:-2] and held[name] == examples[-2:]
    train, held = split_holdout(tasks, 0.1)  # floor(0.1 * n): t0 (3 examples) contributes none
    assert {k: len(v) for k, v in held.items()} == {"t1": 4, "t2": 20}
    assert {k: len(v) for k, v in train.items()} == {"t0": 3, "t1": 36, "t2": 180}
    assert split_holdout(tasks, None) == (tasks, {})
    with pytest.raises(
        DataError, match=r"data.eval_holdout=3 would withhold all 3 usable examples of task t0"
    ):
        split_holdout(tasks, 3)
    with pytest.raises(DataError, match=r"data.eval_holdout=0.2 holds out no example"):
        split_holdout(tasks_of_sizes(4, 2), 0.2)


def test_sni_holdout_is_disjoint_and_the_train_loader_excludes_exactly_it():
    cfg = run_cfg(train=str(SNI), train_tasks=str(SNI_TRAIN_SPLIT), eval_holdout=20)
    ev = build_eval_loader(cfg, ByteTokenizer(), **EXPLICIT)
    everything = read_tasks(SNI, SkipStats(), seed=1234, split_file=SNI_TRAIN_SPLIT)
    assert list(ev.tasks) == sorted(everything) and ev.num_examples == 8 * 20
    for name, examples in ev.tasks.items():
        assert examples == everything[name][-20:]  # the last 20 usable instances, in file order
    held = {e.source for v in ev.tasks.values() for e in v}
    train = build_train_loader(cfg, ByteTokenizer(), **EXPLICIT)
    assert dict(zip(train.mixture.names, train.mixture.sizes.tolist())) == {
        name: len(v) - 20 for name, v in everything.items()
    }
    # Every task cycles through whole epochs, so 6000 draws see each of its examples; none is held out.
    drawn = {example.source for _, example in (next(train.mixture) for _ in range(6000))}
    assert drawn == {e.source for v in everything.values() for e in v} - held
    # No held-out prompt occurs in training under another id either (the sample has no duplicates).
    train_prompts = {e.src for name, v in everything.items() for e in v[:-20]}
    assert not train_prompts & {e.src for v in ev.tasks.values() for e in v}
    # Deterministic, and the seed does not choose the instances (only their prompt delimiters).
    again = build_eval_loader(
        run_cfg(seed=7, train=str(SNI), train_tasks=str(SNI_TRAIN_SPLIT), eval_holdout=20),
        ByteTokenizer(),
        **EXPLICIT,
    )
    assert {e.source for v in again.tasks.values() for e in v} == held
    assert sum(1 for _ in ev) >= 1


def test_fraction_holdout_and_explicit_eval_still_work():
    ev = build_eval_loader(
        run_cfg(train=str(SNI), train_tasks=str(SNI_TRAIN_SPLIT), eval_holdout=0.05),
        ByteTokenizer(),
        **EXPLICIT,
    )
    sizes = {name: len(v) for name, v in ev.tasks.items()}
    assert sizes.pop("task1564_triviaqa_answer_generation") == 5 and set(sizes.values()) == {10}  # 108, 200
    explicit = run_cfg(
        train=str(SNI), train_tasks=str(SNI_TRAIN_SPLIT), eval=str(SNI / "task1508_wordnet_antonyms.json")
    )
    ev = build_eval_loader(explicit, ByteTokenizer(), **EXPLICIT)
    assert list(ev.tasks) == ["task1508_wordnet_antonyms"] and ev.num_examples == 200
    assert build_train_loader(explicit, ByteTokenizer(), **EXPLICIT).mixture.sizes.sum() == 7 * 200 + 108


def test_resume_refuses_another_holdout():
    state = build_train_loader(
        run_cfg(train=str(SNI), train_tasks=str(SNI_TRAIN_SPLIT), eval_holdout=20),
        ByteTokenizer(),
        **EXPLICIT,
    ).get_state()
    for other in (10, 0.1, None):
        with pytest.raises(DataError, match="data.eval_holdout"):
            build_train_loader(
                run_cfg(train=str(SNI), train_tasks=str(SNI_TRAIN_SPLIT), eval_holdout=other),
                ByteTokenizer(),
                state=state,
                **EXPLICIT,
            )
    resumed = build_train_loader(
        run_cfg(train=str(SNI), train_tasks=str(SNI_TRAIN_SPLIT), eval_holdout=20),
        ByteTokenizer(),
        state=state,
        **EXPLICIT,
    )
    assert resumed.get_state() == state
    # The hold-out is in the fingerprint itself, not only through the task sizes it changes ...
    tasks = tasks_of_sizes(5, 9)
    kw = dict(global_batch_size=2, seq_len=32)
    plain = TrainLoader(tasks, ByteTokenizer(), **kw)
    with pytest.raises(DataError, match="different data stream"):
        TrainLoader(tasks, ByteTokenizer(), holdout=2, state=plain.get_state(), **kw)
    # ... and without one the fingerprint is the mixture's, as in states saved before hold-outs existed.
    assert plain.get_state()["fingerprint"] == plain.mixture.fingerprint
    with pytest.raises(ValueError, match="holdout"):
        TrainLoader(tasks, ByteTokenizer(), holdout=0, **kw)


def test_holdout_config_validation():
    cfg = DataConfig.from_dict({"train": "d", "eval_holdout": 20})
    assert DataConfig.from_dict(cfg.to_dict()) == cfg and hash(cfg)
    assert DataConfig.from_dict({"train": "d", "eval_holdout": 0.1}).eval_holdout == 0.1
    bad = [
        ({"eval_holdout": 0}, r"data.eval_holdout must be >= 1"),
        ({"eval_holdout": -3}, r"data.eval_holdout must be >= 1"),
        ({"eval_holdout": 1.0}, r"data.eval_holdout as a fraction must be in \(0, 1\)"),
        ({"eval_holdout": 20.0}, r"data.eval_holdout as a fraction"),
        ({"eval_holdout": True}, r"data.eval_holdout must be an integer"),
        ({"eval_holdout": "20"}, r"data.eval_holdout must be an integer"),
        ({"eval_holdout": 5, "eval": "e"}, r"data.eval_holdout and data.eval are both set"),
        ({"eval_holdout": 5, "eval_tasks": "s.txt"}, r"data.eval_holdout and data.eval_tasks are both set"),
    ]
    for values, message in bad:
        with pytest.raises(ConfigError, match=message):
            DataConfig.from_dict({"train": "d", **values}, source="cfg.yaml:data")
    with pytest.raises(ConfigError, match="data.eval_holdout needs data.train"):
        DataConfig(eval_holdout=5)


def test_demo_config_holds_out_instances_of_all_tasks():
    demo = load_run_config("demo")
    assert demo.data.train == "data/sni" and demo.data.eval is None and demo.data.eval_holdout == 20
    with pytest.raises(ConfigError, match="data.eval_holdout and data.eval are both set"):
        load_run_config("demo", ["data.eval=data/sni"])
    with pytest.raises(
        ConfigError, match="eval.tasks.data=holdout evaluates the instances held out by data.eval_holdout"
    ):
        load_run_config("demo", ["data.eval_holdout=null", "data.eval=data/sni"])
    assert load_run_config(
        "demo", ["data.eval_holdout=null", "data.eval=data/sni", "eval.tasks.data=data/sni"]
    )


def test_build_loaders_reads_the_training_files_once_for_both_loaders(monkeypatch):
    import optiml_jax.data as data

    calls = []
    real = data.read_tasks
    monkeypatch.setattr(
        data, "read_tasks", lambda paths, *a, **kw: calls.append(paths) or real(paths, *a, **kw)
    )
    train, ev = data.build_loaders(
        run_cfg(train=str(SNI), train_tasks=str(SNI_TRAIN_SPLIT), eval_holdout=20),
        ByteTokenizer(),
        **EXPLICIT,
    )
    assert calls == [str(SNI)]
    assert ev.num_examples == 8 * 20 and train.mixture.sizes.sum() + ev.num_examples == sum(
        len(v) for v in read_tasks(SNI, SkipStats(), seed=1234, split_file=SNI_TRAIN_SPLIT).values()
    )
    assert ev.skip_stats is train.skip_stats  # one read: one account of what it skipped
