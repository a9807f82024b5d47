"""One side of a benchmark in a fresh process of its own.

Run in one process, whichever side went second was 10-30% slower (the other library's thread pool
and heap were still there), HF PyTorch included. So a benchmark script re-runs itself with
`--worker NAME ...`; the worker prints one `BENCH_RESULT {json}` line, which is what comes back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

RESULT_PREFIX = "BENCH_RESULT "


def report(result: dict) -> None:
    """What a worker prints as its last line."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_in_fresh_process(script: str, worker: str, argv: list[str]) -> dict:
    """`python script --worker worker *argv` in a new process; its reported result."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", worker, *argv], capture_output=True,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"benchmark worker {worker!r} failed (exit status {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])
