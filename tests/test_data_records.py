"""Random-access records (records.py): the lazy index reads back exactly what a full parse gives, and
with several processes each reads only its share of the bytes at start-up and only its own rows'
records while training, yet all agree on the tasks, the skip counts and the batches."""

import json
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from finetune_helpers import SNI_TEST_TASKS
from simulated_processes import as_processes, process_loaders

from optiml_jax.data import DataError, MixtureStream, read_tasks, sources
from optiml_jax.data.formats import jsonl as jsonl_format
from optiml_jax.data.formats import sni as sni_format
from optiml_jax.data.records import Shard, deal_out
from optiml_jax.data.sources import SkipStats

SNI = Path(__file__).resolve().parents[1] / "optiml_jax" / "assets" / "data" / "sni"


def usable_instances(path):
    """(id, input, first non-empty output) of a task file's usable instances, by a plain full parse."""
    out = []
    for inst in json.loads(Path(path).read_text(encoding="utf-8"))["Instances"]:
        outputs = [o for o in inst["output"] if o.strip()]
        if outputs:
            out.append((inst["id"], inst["input"], outputs[0]))
    return out


def test_lazy_sni_records_equal_a_full_parse():
    tasks = read_tasks(SNI, SkipStats())
    non_ascii = 0
    for file in sorted(SNI.glob("task*.json")):
        expected = usable_instances(file)
        got = [(e.source.split("#", 1)[1], e.input, e.output) for e in tasks[file.stem]]
        assert got == expected, file.name
        raw = file.read_bytes()
        non_ascii += len(raw) != len(raw.decode("utf-8"))
    assert non_ascii >= 1  # byte offsets differ from character offsets in at least one sample file


def write_jsonl(path, lines, newline=b"\n"):
    path.write_bytes(newline.join(lines) + newline)


def jsonl_corpus(root):
    """Three task files: a byte-order mark, CRLF line ends, multi-byte text, blank and bad lines, and a
    last line without a newline, so shard boundaries fall inside lines of every kind."""
    root.mkdir()
    rec = lambda i, text="": json.dumps({"src": f"q{i} {text}", "tgt": f"a{i}"}, ensure_ascii=False).encode()
    a = [rec(i, "é😀" * (i % 7)) if i % 5 else b'{"src": "x", "tgt": ""}' for i in range(60)]
    (root / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(a) + b"\n")
    write_jsonl(
        root / "b.jsonl", [rec(i, "x" * (i * 13 % 90)) for i in range(45)] + [b"", b"{oops"], newline=b"\r\n"
    )
    (root / "c.jsonl").write_bytes(b"\n".join([rec(i) for i in range(30)] + [b"[1]", rec(99)]))
    return root


def test_lazy_jsonl_records_equal_the_lines(tmp_path):
    root = jsonl_corpus(tmp_path / "j")
    stats = SkipStats()
    tasks = read_tasks(root, stats)
    assert {k: len(v) for k, v in tasks.items()} == {"a": 48, "b": 45, "c": 31}
    assert stats.as_dict() == {"empty_target": 12, "malformed_json": 1, "not_an_object": 1}
    assert stats.samples["malformed_json"] == [f"{root / 'b.jsonl'}:47"]
    for name in tasks:
        lines = (root / f"{name}.jsonl").read_bytes().decode("utf-8-sig").splitlines()
        for e in tasks[name]:
            assert json.loads(lines[int(e.source.rsplit(":", 1)[1]) - 1]) == {"src": e.src, "tgt": e.tgt}
    assert tasks["c"][-1].src == "q99 " and tasks["a"][1:3] == [tasks["a"][1], tasks["a"][2]]


class ReadCounter:
    """Counts the bytes each simulated process (thread) reads from data files, by file."""

    def __init__(self, monkeypatch):
        self.bytes: dict[int, Counter] = {}
        self.records: dict[int, list] = {}
        self.owner: dict[int, int] = {}
        counter, real_open = self, sources.open_data_file

        class Handle:
            def __init__(self, path):
                self.path, self.handle = str(path), real_open(path)

            def _count(self, data):
                counter.bytes.setdefault(counter.process(), Counter())[self.path] += len(data)
                return data

            def read(self, n=-1):
                return self._count(self.handle.read(n))

            def readline(self):
                return self._count(self.handle.readline())

            def seek(self, offset):  # while training, only to read a record that starts there
                counter.records.setdefault(counter.process(), []).append((self.path, offset))
                return self.handle.seek(offset)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

        for module in (sources, jsonl_format, sni_format):  # every reader that opens data files
            monkeypatch.setattr(module, "open_data_file", Handle)

    def process(self):
        return self.owner.get(threading.get_ident(), -1)  # -1: the test itself

    def register(self, p):
        self.owner[threading.get_ident()] = p

    def reset(self):
        self.bytes.clear()
        self.records.clear()


def loaders(cfg_data, p, n, allgather, counter=None, **kw):
    return process_loaders(cfg_data, p, n, allgather, counter, seed=3, seq_len=64, **kw)


def tasks_of(loader):
    return dict(zip(loader.mixture.names, loader.mixture._tasks))


def index_of(tasks):
    return {name: [(s.path, r.tolist()) for s, r in records._parts] for name, records in tasks.items()}


@pytest.mark.parametrize("n", [2, 3])
def test_each_process_reads_only_its_share_of_jsonl(tmp_path, monkeypatch, n):
    root = jsonl_corpus(tmp_path / "j")
    data = dict(train=str(root), eps=40)
    single, _ = loaders(data, 0, 1, None)
    counter = ReadCounter(monkeypatch)
    built = as_processes(n, lambda p, g: loaders(data, p, n, g, counter)[0])
    sizes = {str(f): f.stat().st_size for f in root.glob("*.jsonl")}
    longest = max(len(line) for f in root.glob("*.jsonl") for line in f.read_bytes().splitlines())
    for p in range(n):
        for path, size in sizes.items():  # its byte range, plus the rest of the line it ends inside
            assert counter.bytes[p][path] <= size / n + longest + 1, (p, path)
    assert sum(c[path] for c in counter.bytes.values() for path in sizes) < sum(sizes.values()) * 1.35
    # Every process holds the same index and skip counts as a single process reading everything.
    for loader in built:
        assert index_of(tasks_of(loader)) == index_of(tasks_of(single))
        assert loader.skip_stats.as_dict() == single.skip_stats.as_dict()
        assert loader.skip_stats.samples == single.skip_stats.samples

    # While training, a process reads just the records its own rows pack, and the batches are the
    # single process's rows.
    counter.reset()
    batches = as_processes(n, lambda p, g: (counter.register(p), [next(built[p]) for _ in range(4)])[1])
    reference = [next(single) for _ in range(4)]
    for k, ref in enumerate(reference):
        np.testing.assert_array_equal(np.concatenate([b[k]["input_ids"] for b in batches]), ref["input_ids"])
    for p in range(n):
        mine = own_row_records(single, p, n, built[p].mixture.position)
        assert counter.records[p] and set(counter.records[p]) <= mine
        assert len(counter.records[p]) <= sum(
            1 for i in range(built[p].mixture.position) if i % 6 // (6 // n) == p
        )


def own_row_records(loader, p, n, stop):
    """(file, start byte) of the stream examples in process p's rows, up to stream index `stop`."""
    stream = MixtureStream(tasks_of(loader), eps=loader.mixture.eps, seed=loader.mixture.seed)
    out = set()
    local = 6 // n
    for _ in range(stop):
        i, task, j = stream.advance()
        if i % 6 // local == p:
            records = stream._tasks[task]
            k = int(np.searchsorted(records._ends, j, side="right"))
            source, rows = records._parts[k]
            out.add((source.path, int(rows[j - (int(records._ends[k - 1]) if k else 0)][0])))
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_sni_files_are_dealt_out_and_the_others_read_only_their_headers(tmp_path, monkeypatch, n):
    root = tmp_path / "sni"
    # the train-split tasks: the test-split ones are too small for the header bound below
    shutil.copytree(
        SNI, root, ignore=shutil.ignore_patterns("splits", "*.md", *(f"{t}.json" for t in SNI_TEST_TASKS))
    )
    data = dict(train=str(root), eval_holdout=5)
    single_train, single_eval = loaders(data, 0, 1, None)
    counter = ReadCounter(monkeypatch)
    built = as_processes(n, lambda p, g: loaders(data, p, n, g, counter))
    sizes = {str(f): f.stat().st_size for f in root.glob("task*.json")}
    owners = dict(zip(sorted(sizes), deal_out([sizes[f] for f in sorted(sizes)], n)))
    assert set(owners.values()) == set(range(n))
    for path, size in sizes.items():
        for p in range(n):
            if owners[path] == p:  # the whole file, once
                assert counter.bytes[p][path] == size
            else:  # the definition and exemplars only
                assert 0 < counter.bytes[p][path] < size / 4, (p, path)
    for train, ev in built:
        assert index_of(tasks_of(train)) == index_of(tasks_of(single_train))
        assert train.skip_stats.as_dict() == single_train.skip_stats.as_dict() == {"empty_target": 1}
        assert {k: len(v) for k, v in ev.tasks.items()} == {k: len(v) for k, v in single_eval.tasks.items()}
    # An eval pass reads only the held-out examples of the process's own rows, and the rows together are
    # the single process's batches.
    counter.reset()
    passes = as_processes(n, lambda p, g: (counter.register(p), list(built[p][1]))[1])
    reference = list(single_eval)
    assert len(reference) == len(passes[0])
    for k, ref in enumerate(reference):
        np.testing.assert_array_equal(np.concatenate([b[k]["targets"] for b in passes]), ref["targets"])
    examples = [e for v in single_eval.tasks.values() for e in v]
    per_process = 6 // n
    for p in range(n):
        mine = [e for j, e in enumerate(examples) if j % 6 // per_process == p]
        assert len(counter.records[p]) == len(mine)


def test_bad_record_with_on_error_raise_fails_on_every_process_alike(tmp_path):
    root = tmp_path / "j"
    root.mkdir()
    lines = [json.dumps({"src": f"q{i}", "tgt": "a"}).encode() for i in range(40)]
    lines[33] = b'{"src": "q", "tgt": 7}'  # in the last process's byte range
    write_jsonl(root / "t.jsonl", lines)
    data = dict(train=str(root), on_error="raise")

    def build(p, g):
        try:
            loaders(data, p, 2, g)
        except DataError as e:
            return str(e)

    messages = as_processes(2, build)
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{root / 't.jsonl'}:34: non_string_field ('tgt' is int, expected string)")


def test_a_file_changed_under_the_run_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [json.dumps({"src": f"q{i}", "tgt": "a"}).encode() for i in range(5)])
    records = read_tasks(path, SkipStats())["t"]
    path.write_bytes(path.read_bytes().replace(b'"tgt"', b'"TGT"'))
    with pytest.raises(DataError, match=rf"{path}:3: the line no longer holds the usable record"):
        records[2]
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{path}: cannot read the record at bytes"):
        records[4]


def test_shard_without_allgather_reads_everything():
    assert not Shard(1, 4).splits and Shard(1, 4, lambda x: x).splits and not Shard(0, 1, lambda x: x).splits
    assert deal_out([5, 1, 9, 3, 3], 2) == [1, 0, 0, 1, 1]  # 9 | 5, then 3 -> 8 | 9, 3 -> 11, 1 -> 10


def test_hosts_that_see_different_files_all_stop_with_one_clear_error(tmp_path):
    """Hosts reading their own copies of the data (local disks) must hold the same files; one host missing
    the data entirely must not leave the others waiting in the exchange."""
    same, other = tmp_path / "a", tmp_path / "b"
    for root, n in ((same, 3), (other, 4)):
        root.mkdir()
        for i in range(n):
            write_jsonl(root / f"t{i}.jsonl", [json.dumps({"src": "q", "tgt": "a"}).encode()])

    def read(roots):
        def work(p, g):
            try:
                read_tasks(roots[p], SkipStats(), shard=Shard(p, 2, g))
            except DataError as e:
                return str(e)

        return as_processes(2, work)

    messages = read([same, other])
    assert all(
        "the processes see different data files" in m
        and "process 0: 3 files" in m
        and "process 1: 4 files" in m
        for m in messages
    )
    messages = read([same, tmp_path / "missing"])
    assert messages[1] == f"{tmp_path / 'missing'}: no such file or directory"
    assert messages[0] == f"process 1: {messages[1]}"


def test_an_sni_file_changed_before_another_host_reads_its_header_stops_every_process(tmp_path, monkeypatch):
    root = tmp_path / "sni"
    root.mkdir()
    for name in ("task1146_country_capital.json", "task1508_wordnet_antonyms.json"):
        shutil.copy(SNI / name, root / name)
    real = sni_format.read_sni_header

    def changed_under_us(path, span):  # the owner's scan saw task1146 whole; then it was cut short
        if "task1146" in str(path):
            Path(path).write_bytes(Path(path).read_bytes()[:100])
        return real(path, span)

    monkeypatch.setattr(sni_format, "read_sni_header", changed_under_us)

    def work(p, g):
        try:
            read_tasks(root, SkipStats(), shard=Shard(p, 2, g))
        except DataError as e:
            return str(e)

    messages = as_processes(2, work)
    assert all(
        "task1146_country_capital.json: its definition and exemplars no longer parse" in m
        and "the file changed after it was read" in m
        for m in messages
    )
    # The process that read the header says so; the other, which read its own share fine, names it.
    found = [p for p, m in enumerate(messages) if not m.startswith("process ")]
    assert len(found) == 1 and messages[1 - found[0]].startswith(f"process {found[0]}: ")


def test_task_files_are_parsed_once_exactly_as_json_loads_would():
    for file in sorted(SNI.glob("task*.json")):
        text = file.read_text(encoding="utf-8")
        data, (start, end), spans = sni_format._parse_task(text)
        assert data == json.loads(text) and json.loads(text[start:end]) == data["Instances"]
        assert [json.loads(text[a:b]) for a, b in spans] == data["Instances"]
    for text in ["{}", ' {"Instances": []} ', '{"Instances": [1], "Instances": 3}', '{"k" :\t"v\\"}"\r}']:
        assert sni_format._parse_task(text)[0] == json.loads(text)
    for text in [
        '{"a" 1}',
        '{"a": 1,}',
        '{"a": 1 "b": 2}',
        '{"Instances": [1,]}',
        '{"Instances": [1 2]}',
        "{} x",
        "{1: 2}",
        '{"a": 1',
        "[1]",
        "{,}",
        '{"Instances": [,1]}',
    ]:
        with pytest.raises(ValueError):
            sni_format._parse_task(text)
