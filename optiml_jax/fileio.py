"""Writing outputs safely: a directory appears complete or not at all (written under a temporary name,
renamed at the end), also when several hosts write it together, and the cross-process barrier that
needs; a single file likewise. Model directories, converted checkpoints, exports, evaluation results
and the commands' JSON reports all go through here."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


class OutputDirError(ValueError):
    """The output directory cannot be written (exists, not empty, not a directory); the message names it."""


def check_output_dir(directory, overwrite: bool) -> Path:
    """Refuses an existing non-empty directory unless `overwrite`, before any work is done."""
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise OutputDirError(f"{directory}: exists and is not a directory")
        if any(directory.iterdir()) and not overwrite:
            raise OutputDirError(
                f"{directory}: exists and is not empty (pass --overwrite / overwrite=True to replace it)"
            )
    return directory


def write_text_atomic(path, text: str) -> Path:
    """Writes `path` complete or not at all: a temporary file beside it, renamed over it once written,
    so a reader, a failed write (a full disk) or a crash never leaves half a file, nor spoils an old one.
    OSError when it cannot be written (no such directory, no permission), with nothing left behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file: a power cut keeps old or new
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def process_info() -> tuple[int, int]:
    """(process_index, process_count) when JAX is already imported, else (0, 1): the single-process
    converter never imports jax just for this."""
    import sys

    jax = sys.modules.get("jax")
    if jax is None:
        return 0, 1
    return jax.process_index(), jax.process_count()


def barrier(name: str) -> None:
    """Waits until every JAX process reaches the barrier `name` (nothing on a single process)."""
    if process_info()[1] > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def atomic_output_dir(directory, overwrite: bool = False, collective: bool = True) -> Iterator[Path]:
    """Yields a temporary directory next to `directory`; renames it into place only on success.

    On any error the temporary directory is removed, so a failed run leaves nothing behind (and an
    existing `directory` being overwritten is untouched).

    Several JAX processes (multi-host): every process must enter it, with the same `directory`. The
    temporary name is then one all processes agree on (`.NAME.tmp-multihost`, a stale one from a dead
    run is removed first); process 0 creates it and, once every process is past the body (a barrier),
    renames it into place; a second barrier lets no process return before the rename. The body runs on
    every process (Orbax writes collectively); write plain files from process 0 only.
    `collective=False`: one process writes the directory alone, with no barriers.
    """
    directory = check_output_dir(directory, overwrite)
    index, count = process_info()
    if count > 1 and collective:
        yield from _atomic_output_dir_multihost(directory, index)
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, directory: Path) -> None:
    old = None
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _atomic_output_dir_multihost(directory: Path, index: int) -> Iterator[Path]:
    tmp = directory.parent / f".{directory.name}.tmp-multihost"
    tag = str(directory.absolute())
    if index == 0:
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(f"atomic_output_dir:create:{tag}")
    try:
        yield tmp
        barrier(f"atomic_output_dir:written:{tag}")
        if index == 0:
            _replace_dir(tmp, directory)
        barrier(f"atomic_output_dir:renamed:{tag}")
    except BaseException:
        if index == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
