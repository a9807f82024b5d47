"""Hostile input: random bytes, wrong types, huge strings, nested junk, invalid UTF-8, lone surrogates,
empty lines. Nothing may crash except the intended DataError, and every skip is counted and located."""

import json
import logging
import random

import numpy as np
import pytest
from fake_tokenizer import ByteTokenizer

from optiml_jax.data import EvalLoader, TrainLoader
from optiml_jax.data.records import read_jsonl, read_tasks
from optiml_jax.data.sources import MAX_LOGGED_PER_FILE, DataError, SkipStats

HOSTILE = [
    b'{"src": 1, "tgt": "x"}',
    b'{"src": "x", "tgt": null}',
    b'{"src": ["a"], "tgt": "b"}',
    b'{"src": "a", "tgt": {"x": [1, {"y": [[[]]]}]}}',
    b'{"src": NaN, "tgt": "x"}',
    b'{"tgt": "x"}',
    b"{}",
    b'{"src": "a"}',
    b'{"src": "a", "tgt": ""}',
    b'{"src": "a", "tgt": " \\n\\t"}',
    b"[1, 2, 3]",
    b"42",
    b'"just a string"',
    b"null",
    b"true",
    b'{"src": "a", "tgt": "b"',
    b'{"src": "a" "tgt": "b"}',
    b"{'src': 'a', 'tgt': 'b'}",
    b'{"src": "\xff\xfe\xc3", "tgt": "x"}',
    b'\x80{"src": "a", "tgt": "b"}',
    b'{"src": "\\ud800", "tgt": "x"}',
    b'{"src": "a", "tgt": "\\udfff tail"}',
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b"\x00\x01\x02",
    b"\xef\xbb\xbf\xef\xbb\xbf{}",
]
VALID = [
    b'{"src": "Q: 1+1?", "tgt": "2"}',
    b'{"src": "", "tgt": "plain text"}',
    b'{"src": "caf\xc3\xa9 \\u00e9 \xf0\x9f\x98\x80", "tgt": "ok", "extra": [1, {"x": null}]}',
    b'{"tgt": "b", "src": "a", "src2": 5}',
]
HUGE = [
    json.dumps({"src": "a" * 200_000, "tgt": "tail"}).encode(),  # source left-truncated
    json.dumps({"src": "q", "tgt": "b" * 20_000}).encode(),
]  # target alone too long


def random_junk(rng):
    kind = rng.randrange(3)
    if kind == 0:  # raw bytes (no newline, so the line count stays known)
        return bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(rng.randint(1, 80)))
    if kind == 1:  # a valid record cut at a random place
        text = json.dumps({"src": "x" * rng.randint(0, 20), "tgt": "y"})
        return text[: rng.randint(1, len(text) - 1)].encode()
    junk = [[], {"src": [], "tgt": "a"}, {"src": {"tgt": "a"}}, 3.5, {"src": "a", "tgt": 7}]
    return json.dumps(rng.choice(junk)).encode()


def write_hostile(path, seed):
    """Returns (line numbers of valid records, line numbers of hostile records)."""
    rng = random.Random(seed)
    lines = (
        [(b, True) for b in VALID + HUGE]
        + [(b, False) for b in HOSTILE]
        + [(random_junk(rng), False) for _ in range(150)]
        + [(b"", None), (b"   \t", None)] * 5
    )
    rng.shuffle(lines)
    path.write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
    valid = [i + 1 for i, (_, ok) in enumerate(lines) if ok]
    bad = [i + 1 for i, (_, ok) in enumerate(lines) if ok is False]
    return valid, bad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hostile_jsonl_is_skipped_counted_and_located(tmp_path, caplog, seed):
    path = tmp_path / "hostile.jsonl"
    valid, bad = write_hostile(path, seed)
    stats = SkipStats()
    with caplog.at_level(logging.WARNING, logger="optiml_jax.data.sources"):
        examples = list(read_jsonl(path, stats))
    assert [int(e.source.rsplit(":", 1)[1]) for e in examples] == valid
    assert stats.total == len(bad)
    assert {
        "malformed_json",
        "non_string_field",
        "missing_field",
        "empty_target",
        "invalid_utf8",
        "invalid_unicode",
        "not_an_object",
    } <= set(stats.counts)
    # The first few skipped lines are logged with file:line, then one summary for the file.
    logged = [r.getMessage() for r in caplog.records]
    for lineno in bad[:MAX_LOGGED_PER_FILE]:
        assert any(f"{path}:{lineno}: " in m for m in logged), lineno
    assert not any(f"{path}:{bad[MAX_LOGGED_PER_FILE]}: " in m for m in logged)
    assert any(f"skipped {len(bad)} record(s)" in m for m in logged)
    for locations in stats.samples.values():
        assert all(int(loc.rsplit(":", 1)[1]) in bad for loc in locations)

    # With on_error="raise" the first bad line is named.
    with pytest.raises(DataError, match=f"^{path}:{bad[0]}: "):
        list(read_jsonl(path, SkipStats("raise")))

    # What survives goes through tokenising, packing and both loaders without trouble.
    for overlong in ("truncate", "drop"):
        train = TrainLoader(
            {"t": examples}, ByteTokenizer(), global_batch_size=2, seq_len=64, overlong=overlong
        )
        for _ in range(3):
            batch = next(train)
            assert np.isfinite(batch["loss_mask"]).all() and batch["input_ids"].max() < 260
        ev = EvalLoader({"t": examples}, ByteTokenizer(), global_batch_size=2, seq_len=64, overlong=overlong)
        assert sum(1 for _ in ev) >= 1
        assert ev.pack_stats["source_truncated"] >= 1
        assert ev.pack_stats["target_truncated" if overlong == "truncate" else "overlong_dropped"] == 1


def test_hostile_sni_task_files(tmp_path, caplog):
    def task(instances, **extra):
        data = {
            "Definition": ["Do it."],
            "Positive Examples": [{"input": "i", "output": "o"}],
            "Instances": instances,
        }
        data.update(extra)
        return json.dumps(data, indent=4)

    good = {"id": "g1", "input": "in", "output": ["out"]}
    files = {
        "task1_random.json": bytes(random.Random(0).randrange(256) for _ in range(500)),
        "task2_truncated.json": task([good])[:40].encode(),
        "task3_list.json": b"[1, 2]",
        "task4_instances_not_list.json": task({"a": 1}).encode(),
        "task5_no_definition.json": json.dumps({"Instances": [good]}).encode(),
        "task6_definition_int.json": task([good], Definition=5).encode(),
        "task7_bad_utf8.json": task([good]).encode().replace(b'"out"', b'"o\xffut"'),
        "task8_deep.json": b"[" * 100_000,
        "task9_mixed.json": task(
            [
                good,
                3,
                None,
                {"input": 3, "output": ["x"]},
                {"id": 7, "input": "x"},
                {"id": "e", "input": "x", "output": ["", "  "]},
                {"id": "d", "input": "x", "output": {"a": 1}},
                {"id": "s", "input": "x", "output": "single string"},
                {"id": "f", "input": "x", "output": [1, "", "second"]},
                {"id": "u", "input": "\ud800", "output": ["x"]},
            ],
            **{"Positive Examples": [{"input": 1}, "junk", {"input": "i", "output": "o"}]},
        ).encode(),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    stats = SkipStats()
    with caplog.at_level(logging.WARNING, logger="optiml_jax.data.sources"):
        tasks = read_tasks(tmp_path, stats, template="few_shot", num_shots=2)
    assert list(tasks) == ["task9_mixed"]
    mixed = tasks["task9_mixed"]
    assert [e.tgt for e in mixed] == ["out", "single string", "second"]
    # Only the one valid positive example is used as an exemplar (2 shots asked for, 1 usable).
    assert mixed[0].src.startswith("Instructions: Do it.\n\nInput: i") and mixed[0].src.count("Input: ") == 2
    assert stats.counts["bad_exemplar"] == 2 and stats.counts["empty_target"] == 1
    assert stats.counts["malformed_json"] == 2 and stats.counts["invalid_utf8"] == 2
    assert stats.counts["bad_task_file"] == 4
    text = caplog.text
    assert stats.samples["empty_target"] == [f"{tmp_path / 'task9_mixed.json'}#e"]  # 6th skip: not logged
    assert stats.samples["invalid_unicode"] == [f"{tmp_path / 'task9_mixed.json'}#u"]
    assert "skipped 9 record(s) (5 shown above)" in text
    assert f"{tmp_path / 'task9_mixed.json'}#Instances[1]: not_an_object" in text
    assert f"{tmp_path / 'task2_truncated.json'}:" in text
    with pytest.raises(DataError, match=r"task1_random.json:\d+: "):
        read_tasks(tmp_path, SkipStats("raise"))
