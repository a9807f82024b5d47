"""Random-access records: data files indexed by byte spans, the index built in shards across processes.

On a pod every process must know every task's size (the mixture may draw any task for any batch row),
but none should read every byte of the data. So no process loads the data; each builds the same index
of where the usable records are, and reads a record (one seek) only when a row of its own needs it:

* JSONL: process p checks the lines that START in the p-th of `process_count` equal byte ranges of each
  file, and notes the byte span of every usable line.
* Parquet: likewise with row groups: process p checks the rows of the groups that start in its byte
  range (every process reads each file's footer), reading only the mapped columns, and notes the row
  group and row of every usable row. While training a row group is read again (its mapped columns) when
  a row of it is needed, and the most recent ones are kept, so the rows of a batch in one group cost
  one read. Random access costs a row group per example: files with small row groups read fastest.
* SNI task files (one JSON document each, which cannot be parsed from the middle) are dealt out whole,
  largest first to the least loaded process; the owner parses its files and notes the byte span of every
  usable instance and of the Instances array. Every process then reads only the rest of each file (its
  definition and exemplars: a few KB of a file that is mostly instances).
* One exchange (two allgathers) then gives every process every span, line count and skipped record.
  So all processes hold the same index and count the same skips, a JSONL skip is reported with its line
  number in the whole file, and with on_error="raise" every process raises the same error at the same
  point: an error raised by one process alone would leave the others waiting in a collective.

Records are checked once, here; reading one again at step time only re-parses it (a record that no
longer parses means the file changed under the run, which is reported as such).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import os
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from optiml_jax.data.formats import AUTO, Format, Source, format_choices, get_format, resolve_format
from optiml_jax.data.sources import MAX_LOGGED_PER_FILE, DataError, Example, Fields, SkipStats

logger = logging.getLogger(__name__)

# allgather(local int64 vector) -> [process_count, len] array, every process's vector in process order
# (jax.experimental.multihost_utils.process_allgather does this). Every process passes the same length.
AllGather = Callable[[np.ndarray], np.ndarray]
# A record: start byte, end byte (Parquet: row group, row in the group), its number in the file (JSONL: line;
# SNI: position in Instances; Parquet: row), its index among its task's usable records (SNI templates seed
# the answer delimiter with it) and, in the exchange only, the code of its task among the scan's TaskCodes.
RECORD_COLUMNS = 5


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's part of the start-up reading: process `index` of `count`, exchanging what it found
    through `allgather`. Without an allgather (or with one process) a process reads everything itself."""

    index: int = 0
    count: int = 1
    allgather: Optional[AllGather] = None

    @property
    def splits(self) -> bool:
        return self.count > 1 and self.allgather is not None


# ---------------------------------------------------------------------------------------- records
def locate(ends: np.ndarray, i: int) -> tuple[int, int]:
    """(part, index in that part) of item i of sequences laid end to end, `ends` their cumulative lengths."""
    k = int(np.searchsorted(ends, i, side="right"))
    return k, i - (int(ends[k - 1]) if k else 0)


class TaskRecords(SequenceABC):
    """A task's usable examples, in file order, each read from its file when indexed. Slicing (step 1)
    gives another TaskRecords without reading anything."""

    def __init__(self, parts: Sequence[tuple[Source, np.ndarray]], benchmark: Optional[str] = None):
        self._parts = [(source, records) for source, records in parts if len(records)]
        self._ends = np.cumsum([len(records) for _, records in self._parts], dtype=np.int64)
        self.benchmark = benchmark  # the collection its rows name (data.fields.benchmark), if they do

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i):
        n = len(self)
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            parts, offset = [], 0
            for source, records in self._parts:
                lo, hi = max(start - offset, 0), min(stop - offset, len(records))
                if lo < hi:
                    parts.append((source, records[lo:hi]))
                offset += len(records)
            return TaskRecords(parts, self.benchmark)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"record {i} of a task of {n}")
        k, row = locate(self._ends, j)
        source, records = self._parts[k]
        start, end, number, index = (int(v) for v in records[row])
        return source.example(start, end, number, index)

    def __iter__(self) -> Iterator:
        return (self[j] for j in range(len(self)))

    def __eq__(self, other) -> bool:
        if not isinstance(other, SequenceABC) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"TaskRecords({len(self)} records in {len(self._parts)} file(s))"


# ---------------------------------------------------------------------------------------- exchange
def _pack(meta, arrays: Sequence[np.ndarray]) -> np.ndarray:
    text = json.dumps(meta).encode("ascii")
    text += b" " * (-len(text) % 8)
    header = np.array([len(text) // 8, len(arrays), *(a.size for a in arrays)], np.int64)
    return np.concatenate(
        [header, np.frombuffer(text, np.int64)] + [np.asarray(a, np.int64).reshape(-1) for a in arrays]
    )


def _unpack(vector: np.ndarray):
    words, count = int(vector[0]), int(vector[1])
    sizes, pos = vector[2 : 2 + count], 2 + count
    meta = json.loads(np.ascontiguousarray(vector[pos : pos + words]).tobytes())
    pos += words
    arrays = []
    for size in sizes:
        arrays.append(np.asarray(vector[pos : pos + int(size)]).reshape(-1, RECORD_COLUMNS))
        pos += int(size)
    return meta, arrays


def exchange(shard: Shard, meta, arrays: Sequence[np.ndarray]) -> list:
    """Every process's (meta, arrays), in process order: `meta` is anything JSON can carry, `arrays` are
    int64 record arrays. Collective when the shard splits. A single process round-trips its own, so
    both cases see the same types (JSON lists, string keys)."""
    payload = _pack(meta, arrays)
    if not shard.splits:
        return [_unpack(payload)]
    lengths = np.asarray(shard.allgather(np.array([payload.size], np.int64)), np.int64).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.int64)
    padded[: payload.size] = payload
    everything = np.asarray(shard.allgather(padded), np.int64).reshape(len(lengths), -1)
    return [_unpack(everything[q, : int(lengths[q])]) for q in range(len(lengths))]


# ---------------------------------------------------------------------------------------- index
@dataclasses.dataclass(frozen=True)
class _DataFile:
    format: Format  # the format reading the file
    path: Path
    task: str
    size: int
    listed: str  # what the processes compare to know they read the same files


def _list_files(paths, format: str, split_file, template: str) -> list[_DataFile]:
    files = []
    for path in paths:
        fmt = resolve_format(path, format)
        if template != "zero_shot" and not fmt.has_exemplars:
            raise DataError(
                f"{path}: template {template!r} applies to SNI task files only; {fmt.name} records have "
                f"no exemplars"
            )
        # Each JSONL/Parquet file is one corpus (task) named by its stem, unless data.fields.task names each
        # record's task; files with the same stem in different subdirectories (metaseq's shards 00/, 01/,
        # ...) are the same corpus, concatenated in path order. All shards are mixed at once, not one shard
        # per epoch as in metaseq: the mixer already cycles and reshuffles every task per epoch.
        reader = get_format(fmt.reads_as) if fmt.reads_as else fmt
        # A split file names SNI tasks; other formats' data is read whole, as it always was.
        for file in fmt.files(path, split_file if fmt.takes_split_file else None):
            try:
                size = file.stat().st_size
            except OSError as e:
                raise DataError(f"{file}: cannot open ({e.strerror})") from None
            files.append(_DataFile(reader, file, file.stem, size, fmt.listed(path, file)))
    return files


def deal_out(sizes: Sequence[int], count: int) -> list[int]:
    """Owner process of each file: largest first, each to the process with the fewest bytes so far."""
    owners = [0] * len(sizes)
    loads = [(0, q) for q in range(count)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, q = heapq.heappop(loads)
        owners[i] = q
        heapq.heappush(loads, (load + sizes[i], q))
    return owners


def _skips_to_send(skips: list) -> list:
    # The global first MAX_LOGGED_PER_FILE of a file are among every process's first that many, so
    # details (the longest part) are sent only for those.
    return [[*skip[:-1], skip[-1] if k < MAX_LOGGED_PER_FILE else ""] for k, skip in enumerate(skips)]


def _record_array(flat) -> np.ndarray:
    """[n, RECORD_COLUMNS] from a scan's flat (a, b, number, task code) records; indices are set later."""
    records = np.zeros((len(flat) // 4, RECORD_COLUMNS), np.int64)
    records[:, [0, 1, 2, 4]] = np.frombuffer(flat, np.int64).reshape(-1, 4)
    return records


def _scan_my_share(files: list[_DataFile], owners: list[int], me: int, count: int, fields: Fields):
    """(meta, arrays) to exchange, and the headers of the whole files this process owns (read by the
    others themselves: the exchange carries only where the records are)."""
    meta, arrays, headers = {"files": {}, "error": None}, [], {}
    try:
        for i, file in enumerate(files):
            if file.format.whole_files and owners[i] != me:
                continue
            entry, flat = file.format.scan(file.path, fields, me, 1 if file.format.whole_files else count)
            if "header" in entry:
                headers[i] = entry.pop("header")
            if not file.format.whole_files:
                entry["skips"] = _skips_to_send(entry["skips"])
            entry["array"] = len(arrays)
            meta["files"][str(i)] = entry
            arrays.append(_record_array(flat))
    except DataError as e:  # reported by every process after the exchange, never by this one alone
        meta["error"] = str(e)
    return meta, arrays, headers


def _raise_first_error(gathered: list, me: int) -> None:
    """Every process raises the first error any process met, named by the process that met it."""
    for q, (their, _) in enumerate(gathered):
        if their["error"]:
            raise DataError(their["error"] if q == me else f"process {q}: {their['error']}")


def read_tasks(
    paths,
    stats: SkipStats,
    *,
    format: str = AUTO,
    split_file=None,
    template: str = "zero_shot",
    num_shots: int = 0,
    seed: int = 0,
    shard: Shard = Shard(),
    fields: Fields = Fields(),  # noqa: B008 (frozen, never mutated)
) -> dict[str, TaskRecords]:
    """Every usable example under `paths` (a path or several; `hf:NAME[:SPLIT]` = a hub dataset, see
    formats/hub.py), by task, in a deterministic order, read lazily. `fields` maps our fields to the keys or
    columns of JSONL and Parquet records (SNI task files have their own layout). Collective when `shard`
    splits: every process must call it, and all get the same result. What is skipped goes to `stats`
    (see SkipStats); task name collisions merge (same name = same corpus)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if format not in format_choices():
        raise ValueError(f"format must be one of {format_choices()}, got {format!r}")
    me, count = (shard.index, shard.count) if shard.splits else (0, 1)
    try:
        files = _list_files(paths, format, split_file, template)
    except DataError as e:  # raised after the exchange, on every process (this one may be alone in it)
        files, listing_error = [], str(e)
    else:
        listing_error = None
    whole = [i for i, f in enumerate(files) if f.format.whole_files]
    owners = [0] * len(files)
    for i, q in zip(whole, deal_out([files[i].size for i in whole], count)):
        owners[i] = q
    meta, arrays, headers = _scan_my_share(files, owners, me, count, fields)
    meta["error"] = listing_error or meta["error"]
    # Hosts with their own copies of the data (local disks) must hold the same files, or the shares
    # and the index would not fit together.
    meta["listing"] = hashlib.sha256(json.dumps([[f.listed, f.size] for f in files]).encode()).hexdigest()[
        :16
    ]
    meta["num_files"] = len(files)
    gathered = exchange(shard, meta, arrays)
    _raise_first_error(gathered, me)
    listings = {(their["listing"], their["num_files"]) for their, _ in gathered}
    if len(listings) > 1:
        seen = "; ".join(
            f"process {q}: {their['num_files']} files ({their['listing']})"
            for q, (their, _) in enumerate(gathered)
        )
        raise DataError(
            f"{', '.join(map(str, paths))}: the processes see different data files (paths or sizes "
            f"differ: {seen}); every host must read the same data, e.g. from a shared filesystem"
        )

    _read_other_headers(files, owners, gathered, headers, shard, me)
    return _assemble_tasks(files, owners, gathered, headers, stats, template, num_shots, seed, fields)


def _read_other_headers(files, owners, gathered, headers: dict, shard: Shard, me: int) -> None:
    """Adds to `headers` the headers (SNI: definitions and exemplars) of the whole files others own. A failure
    here (a file that changed since its owner read it) is this process's alone, so it is exchanged like
    the others (collective when `shard` splits)."""
    header_error = None
    for i, file in enumerate(files):
        entry = gathered[owners[i]][0]["files"].get(str(i), {})
        if file.format.whole_files and i not in headers and not entry.get("problem"):
            try:
                headers[i] = file.format.read_header(file.path, entry)
            except DataError as e:
                header_error = str(e)
                break
    if shard.splits:
        _raise_first_error(exchange(shard, {"error": header_error}, []), me)
    elif header_error:
        raise DataError(header_error)


def _gather_rows(
    file: _DataFile, i: int, gathered, stats: SkipStats, benchmarks: dict
) -> tuple[np.ndarray, list[str]]:
    """A shared (not whole) file's records from every process's share (task codes made global, into the
    returned task names), its skips counted in file order; each task's benchmark noted in `benchmarks`."""
    name, chunks, tasks, codes, first_line = str(file.path), [], [], {}, 0
    for meta, arrays in gathered:  # process order is file order
        entry = meta["files"][str(i)]
        records = arrays[entry["array"]].copy()
        if len(records):
            their = entry["tasks"] or [file.task]  # without a task field every code is 0: the file's stem
            for task, benchmark in zip(their, entry.get("benchmarks", [])):
                _note_benchmark(benchmarks, task, benchmark, name)
            for task in their:
                if task not in codes:
                    codes[task] = len(tasks)
                    tasks.append(task)
            records[:, 4] = np.asarray([codes[t] for t in their], np.int64)[records[:, 4]]
        # A JSONL share counts its lines from 1 ("lines" says how many it read); Parquet rows are the file's.
        records[:, 2] += first_line
        for number, reason, detail in entry["skips"]:
            stats.skip(reason, name, file.format.where(name, first_line + number), detail)
        first_line += entry.get("lines", 0)
        chunks.append(records)
    stats.end_file(name)
    return np.concatenate(chunks), tasks


def _note_benchmark(benchmarks: dict, task: str, benchmark: Optional[str], file: str) -> None:
    if benchmark is None:
        return
    first = benchmarks.setdefault(task, benchmark)
    if first != benchmark:
        raise DataError(
            f"{file}: task {task!r} is in benchmark {benchmark!r} here and {first!r} elsewhere; a task "
            f"belongs to one benchmark (data.fields.benchmark)"
        )


def _by_task(records: np.ndarray, tasks: list[str]) -> list[tuple[str, np.ndarray]]:
    """(task, its records in file order) for each task of a file, in order of first appearance."""
    if len(tasks) == 1:
        return [(tasks[0], records)]
    order = np.argsort(records[:, 4], kind="stable")
    counts = np.bincount(records[:, 4], minlength=len(tasks))
    out, start = [], 0
    for task, n in zip(tasks, counts.tolist()):
        out.append((task, records[order[start : start + n]]))
        start += n
    return out


def _assemble_tasks(
    files,
    owners,
    gathered,
    headers,
    stats: SkipStats,
    template: str,
    num_shots: int,
    seed: int,
    fields: Fields,
) -> dict[str, TaskRecords]:
    """The tasks from every process's share of the index, with skips counted in file order."""
    parts: dict[str, list] = {}
    benchmarks: dict[str, str] = {}
    for i, file in enumerate(files):
        name = str(file.path)
        if not file.format.whole_files:
            records, tasks = _gather_rows(file, i, gathered, stats, benchmarks)
            source_of = file.format.sources(name, fields, seed)
            for task, task_records in _by_task(records, tasks or [file.task]):
                parts.setdefault(task, []).append((source_of(task), task_records))
            continue
        meta, arrays = gathered[owners[i]]
        entry = meta["files"][str(i)]
        for reason, where, detail in [entry["problem"]] if entry["problem"] else entry["skips"]:
            stats.skip(reason, name, where, detail)
        stats.end_file(name)
        if entry["problem"]:
            continue
        exemplars = num_shots if template == "few_shot" else 0
        source = file.format.source(name, file.task, headers[i], exemplars, seed)
        parts.setdefault(file.task, []).append((source, arrays[entry["array"]]))
    tasks = {}
    for task, task_parts in parts.items():
        # Each record's index counts the task's usable records (across its files): the SNI template
        # seeds the answer delimiter with it.
        numbered, index = [], 0
        for source, records in task_parts:
            records = records[:, :4].copy()
            records[:, 3] = np.arange(index, index + len(records))
            index += len(records)
            numbered.append((source, records))
        records = TaskRecords(numbered, benchmarks.get(task))
        if len(records):
            tasks[task] = records
        else:
            logger.warning("task %s has no usable examples; it is left out", task)
    return tasks


def read_jsonl(path: str | os.PathLike, stats: SkipStats, task: Optional[str] = None) -> Iterator[Example]:
    """The usable `{"src", "tgt"}` records of one JSONL file, in order (task defaults to its stem)."""
    found = read_tasks([path], stats, format="jsonl")
    for records in found.values():
        for example in records:
            yield example if task is None else dataclasses.replace(example, task=task)
