"""Plain text (`.txt`): one document a line, trained on whole (no prompt: the `loss: all` slices of
data.mixture, e.g. OPT's pre-training text). Read like JSONL (each process checks the lines starting in
its byte range, a line is read again when a batch needs it); blank lines are no records. Detected from a
`.txt` file or a directory holding only `.txt` files, never chosen by data.format: split files are `.txt`
too, and a directory of SNI task files with its split files is SNI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from optiml_jax.data.formats.base import Format, register
from optiml_jax.data.formats.jsonl import JsonlSource, scan_jsonl
from optiml_jax.data.sources import EvalDataError, Fields, bad_unicode


def check_text_line(raw: bytes, fields: Fields) -> tuple[Optional[dict], Optional[tuple[str, str]]]:
    """({"src": "", "tgt": the line}, None), (None, None) for a blank line, or (None, (reason, detail))."""
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return None, ("invalid_utf8", f"byte {e.start}: {e.reason}")
    if not line.strip():
        return None, None
    if bad_unicode(line):
        return None, ("invalid_unicode", "the line holds a lone surrogate")
    return {"src": "", "tgt": line}, None


@register
class TextFormat(Format):
    name = "text"
    suffixes = (".txt",)
    selectable = False

    def claims(self, path) -> bool:
        path = Path(path)
        if path.is_file():
            return path.suffix == ".txt"
        if not path.is_dir():
            return False
        found = False
        for file in (p for p in path.rglob("*") if p.is_file()):  # stops at the first other file
            if file.suffix != ".txt":
                return False
            found = True
        return found

    def scan(self, path: Path, fields: Fields, me: int, count: int):
        size = path.stat().st_size
        scan = scan_jsonl(path, size * me // count, size * (me + 1) // count, fields, check_text_line)
        return {"lines": scan.lines, "skips": scan.skips, "tasks": scan.tasks.names}, scan.records

    def sources(self, path: str, fields: Fields, seed: int):
        return lambda task: JsonlSource(path, task, fields, seed, check_text_line)

    def eval_records(self, file: Path, fields: Fields):
        raise EvalDataError(
            f"{file}: plain text has no prompts and targets to evaluate; use JSONL or Parquet"
        )
