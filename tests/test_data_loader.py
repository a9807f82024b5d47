"""Loaders: host sharding (global batch independent of process count), exact resume, one-pass eval,
DataConfig validation and the build_* entry points."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fake_tokenizer import ByteTokenizer
from simulated_processes import as_processes

from optiml_jax.config import ConfigError
from optiml_jax.data import (
    BATCH_KEYS,
    DataConfig,
    DataError,
    EvalLoader,
    Example,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
)

SNI = Path(__file__).resolve().parents[1] / "optiml_jax" / "assets" / "data" / "sni"


def make_tasks(seed=0):
    rng = random.Random(seed)
    words = ["alpha", "be", "c", "delta", "epsilon", "z"]
    tasks = {}
    for t, n in enumerate([3, 40, 200]):
        tasks[f"task{t}"] = [
            Example(
                f"task{t}",
                " ".join(rng.choices(words, k=rng.randint(0, 12))),
                " ".join(rng.choices(words, k=rng.randint(1, 6))),
                f"f{t}:{i + 1}",
            )
            for i in range(n)
        ]
    return tasks


def short_tasks():
    # 2..6 row slots per example, or 8 after left-truncation of "abcdefghij": with seq_len 8 rows close
    # because the next example does not fit, because an example fills them exactly, and both at once
    # (two rows closed by one example).
    return {
        "short": [
            Example("short", src, tgt, f"s:{i}")
            for i, (src, tgt) in enumerate(
                (s, t) for s in ("", "a", "ab", "abc", "abcdefghij") for t in ("x", "xy")
            )
        ]
    }


def loader(tasks=None, **kw):
    args = dict(global_batch_size=4, seq_len=48, eps=50, seed=1)
    args.update(kw)
    return TrainLoader(tasks or make_tasks(), ByteTokenizer(), **args)


def take(it, n):
    return [next(it) for _ in range(n)]


class CountingTokenizer(ByteTokenizer):
    def __init__(self):
        self.calls = []

    def encode_batch(self, texts, add_bos=True):
        self.calls.append(list(texts))
        return super().encode_batch(texts, add_bos)

    @property
    def texts(self):
        return [t for call in self.calls for t in call]

    @property
    def sources(self):  # tokenize_examples encodes a chunk's sources, then its targets
        return [t for call in self.calls[0::2] for t in call]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_keys_dtypes_shapes_and_invariants():
    batch = next(loader())
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "input_ids": (np.int32, (4, 48)),
        "targets": (np.int32, (4, 48)),
        "loss_mask": (np.float32, (4, 48)),
        "segment_ids": (np.int32, (4, 48)),
        "positions": (np.int32, (4, 48)),
    }
    seg = batch["segment_ids"]
    pad = seg == 0
    assert (batch["input_ids"][pad] == 1).all() and (batch["loss_mask"][pad] == 0).all()
    assert (batch["input_ids"] != 2).all()  # neither BOS nor </s> is ever an input
    for row in range(4):
        for s in set(seg[row][seg[row] > 0]):
            idx = np.flatnonzero(seg[row] == s)
            np.testing.assert_array_equal(batch["positions"][row, idx], np.arange(len(idx)))
            assert batch["targets"][row, idx[-1]] == 2 and batch["loss_mask"][row, idx[-1]] == 1


def test_host_sharding_concatenates_to_the_global_batch():
    full = take(loader(), 5)
    halves = [take(loader(process_index=p, process_count=2), 5) for p in range(2)]
    quarters = [take(loader(process_index=p, process_count=4), 5) for p in range(4)]
    for step in range(5):
        for parts in (halves, quarters):
            joined = {k: np.concatenate([p[step][k] for p in parts]) for k in BATCH_KEYS}
            assert_batches_equal([joined], [full[step]])
    assert halves[0][0]["input_ids"].shape == (2, 48)
    with pytest.raises(ValueError, match="not divisible"):
        loader(process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        loader(process_index=2, process_count=2)


def test_exact_resume_after_7_batches():
    uninterrupted = take(loader(), 12)
    first = loader()
    take(first, 7)
    state = json.loads(json.dumps(first.get_state()))  # must survive a JSON checkpoint
    assert state["batches"] == 7
    resumed = loader(state=state)
    assert_batches_equal(take(resumed, 5), uninterrupted[7:])
    # Via set_state on a loader that has already moved on, and on another process count.
    other = loader()
    take(other, 3)
    other.set_state(state)
    assert_batches_equal(take(other, 5), uninterrupted[7:])
    parts = [take(loader(state=state, process_index=p, process_count=2), 5) for p in range(2)]
    for step in range(5):
        joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]]) for k in BATCH_KEYS}
        assert_batches_equal([joined], [uninterrupted[7 + step]])


def test_resume_at_every_batch_boundary_with_exactly_full_rows():
    kw = dict(tasks=short_tasks(), global_batch_size=3, seq_len=8)
    ref = loader(**kw)
    reference = take(ref, 15)
    probe = loader(**kw)
    for step in range(14):
        state = probe.get_state()
        assert_batches_equal(take(loader(state=state, **kw), 1), reference[step : step + 1])
        next(probe)


def test_resume_refuses_other_data():
    state = loader().get_state()
    with pytest.raises(DataError, match="different data stream"):
        loader(seed=2, state=state)
    with pytest.raises(DataError, match="different data stream"):
        loader(eps=10, state=state)
    with pytest.raises(DataError, match="not a TrainLoader state"):
        loader(state={"stream_index": 3})


def test_eval_loader_one_pass_with_padded_last_batch():
    tasks = make_tasks()
    n_examples = sum(len(v) for v in tasks.values())
    ev = EvalLoader(tasks, ByteTokenizer(), global_batch_size=8, seq_len=64)
    batches = list(ev)
    assert batches and all(b["input_ids"].shape == (8, 64) for b in batches)
    segments = sum(len(set(row[row > 0])) for b in batches for row in b["segment_ids"])
    assert segments == n_examples == ev.pack_stats["examples"]
    last = batches[-1]
    empty_rows = ~last["segment_ids"].any(axis=1)
    assert empty_rows.any()  # the last batch is padded with whole empty rows
    assert (last["loss_mask"][empty_rows] == 0).all() and (last["input_ids"][empty_rows] == 1).all()
    assert_batches_equal(list(ev), batches)  # iterating again starts over
    # Row r holds examples r, r + 8, ... in order: row 0 starts with the first example of task0.
    first = tasks["task0"][0]
    assert bytes(b - 4 for b in batches[0]["input_ids"][0, : len(first.src)]).decode() == first.src
    # Two processes: each tokenises only its rows' examples and they agree on the number of batches.
    tokenizers = [CountingTokenizer(), CountingTokenizer()]

    def process(p, allgather):
        ev = EvalLoader(
            tasks,
            tokenizers[p],
            global_batch_size=8,
            seq_len=64,
            process_index=p,
            process_count=2,
            allgather=allgather,
        )
        return list(ev), ev.stats()

    (part0, stats0), (part1, stats1) = as_processes(2, process)
    assert len(part0) == len(part1) == len(batches)
    for step, batch in enumerate(batches):
        assert_batches_equal(
            [{k: np.concatenate([part0[step][k], part1[step][k]]) for k in BATCH_KEYS}], [batch]
        )
    assert stats0 == stats1 == ev.stats()
    assert len(tokenizers[0].texts) + len(tokenizers[1].texts) == 2 * n_examples  # src and tgt, once each


def test_each_process_tokenises_only_the_examples_of_its_rows():
    # Row r of every batch packs stream examples r, r + B, r + 2B, ... (B = 4): hand-checkable with
    # seq_len 8 and examples of 2..6 row slots.
    tasks = short_tasks()
    mixture = loader(tasks).mixture
    stream = [example for _, example in (next(mixture) for _ in range(2000))]

    def input_text(example):  # the row slots an example takes: tokens[:-1], cut from the left to 8 slots
        return (example.src + " " + example.tgt + "\x02")[-9:][:-1]

    batches = take(loader(tasks, global_batch_size=4, seq_len=8), 6)
    for r in range(4):
        packed = [
            bytes(b - 4 for b in batch["input_ids"][r][batch["segment_ids"][r] == s]).decode()
            for batch in batches
            for s in range(1, batch["segment_ids"][r].max() + 1)
        ]
        assert len(packed) >= 6 and packed == [input_text(e) for e in stream[r::4][: len(packed)]]
    # Process 1 of 2 (rows 2 and 3) tokenises only stream examples 2, 3, 6, 7, 10, 11, ...
    tokenizer = CountingTokenizer()
    half = loader(tasks, global_batch_size=4, seq_len=8, process_index=1, process_count=2)
    half.tokenizer = tokenizer
    take(half, 6)
    mine = [e.src.rstrip(" ") for i, e in enumerate(stream) if i % 4 in (2, 3)]
    assert 12 <= len(tokenizer.sources) <= 2 * 256 and tokenizer.sources == mine[: len(tokenizer.sources)]


def test_state_of_several_processes_is_gathered_and_resumes_anywhere():
    reference = take(loader(), 12)

    def process(p, allgather):
        part = loader(process_index=p, process_count=2, allgather=allgather)
        take(part, 7)
        return part.get_state(), part.stats()

    (state0, stats0), (state1, stats1) = as_processes(2, process)
    single = loader()
    take(single, 7)
    assert state0 == state1 == single.get_state()
    assert stats0 == stats1 == single.stats()
    assert_batches_equal(take(loader(state=state0), 5), reference[7:])
    with pytest.raises(ValueError, match="allgather"):
        loader(process_index=0, process_count=2).get_state()


def test_state_from_an_older_version_or_another_batch_size_continues_without_repeats():
    state = loader().get_state()
    v1 = {**state, "version": 1, "stream_index": 40}
    del v1["row_starts"]
    assert loader(state=v1).get_state()["row_starts"] == [40, 41, 42, 43]
    # A stream index that is not a multiple of the batch size: row r still gets only examples i % 4 == r.
    off = {**v1, "stream_index": 41}
    resumed = loader(state=off)
    assert resumed.get_state()["row_starts"] == [44, 41, 42, 43]
    take(resumed, 2)
    assert all(i % 4 == r for r, i in enumerate(resumed.get_state()["row_starts"]))
    moved = loader()
    take(moved, 3)
    starts = moved.get_state()["row_starts"]
    wider = loader(global_batch_size=6, state=moved.get_state())
    new = wider.get_state()["row_starts"]
    assert min(new) >= max(starts) and sorted(i % 6 for i in new) == list(range(6))
    with pytest.raises(DataError, match="row_starts"):
        loader(state={**state, "row_starts": [0, 2, 1, 3]})


def test_data_config_validation():
    cfg = DataConfig.from_dict({"train": ["a", "b"], "eval": "c", "eps": 128})
    assert cfg.train == ("a", "b") and cfg.eps == 128 and hash(cfg)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    bad = [
        ({"eps": 0}, "data.eps"),
        ({"eps": True}, "data.eps"),
        ({"format": "csv"}, "data.format='csv'"),
        ({"template": "few_shot"}, "num_shots"),
        ({"num_shots": 2}, "num_shots=2"),
        ({"overlong": "cut"}, "data.overlong"),
        ({"on_error": "ignore"}, "data.on_error"),
        ({"train": 3}, "data.train"),
        ({"train": []}, "data.train"),
        ({"epss": 1}, "unknown data key.*epss"),
    ]
    for values, message in bad:
        with pytest.raises(ConfigError, match=message):
            DataConfig.from_dict(values, source="cfg.yaml:data")


def test_build_loaders_from_a_training_config_on_the_sni_sample():
    cfg = SimpleNamespace(
        data=DataConfig(train=str(SNI), eval=str(SNI / "task1508_wordnet_antonyms.json")),
        seed=1234,
        train=SimpleNamespace(batch_size=4, seq_len=256),
    )
    train = build_train_loader(cfg, ByteTokenizer(), process_index=1, process_count=2)
    batch = next(train)
    assert batch["input_ids"].shape == (2, 256)
    with pytest.raises(ValueError, match="allgather"):  # a simulated process count has no collectives
        train.stats()
    train = build_train_loader(cfg, ByteTokenizer(), process_index=0, process_count=1)
    next(train)
    assert train.stats()["skipped/empty_target"] == 1 and 4 <= train.stats()["packed/rows"] <= 8
    ev = build_eval_loader(cfg, ByteTokenizer(), process_index=0, process_count=1)
    assert ev.num_examples == 200 and sum(1 for _ in ev) >= 1
    assert (
        build_eval_loader(
            DataConfig(train="x"),
            ByteTokenizer(),
            seed=0,
            batch_size=1,
            seq_len=8,
            process_index=0,
            process_count=1,
        )
        is None
    )
    with pytest.raises(ConfigError, match="train.batch_size is not set"):
        build_train_loader(cfg.data, ByteTokenizer(), seed=0, process_index=0, process_count=1)
