"""Training-state checkpoints: Orbax CheckpointManager saves of the whole TrainState plus the data
loader's position, restored straight into the shards, the workdir they live in, and the final model.

A checkpoint holds params, Adam state, step, the base dropout key, the non-finite counters and the data
loader position, so resuming reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from optiml_jax.checkpoints.model_format import save_model
from optiml_jax.config import ConfigError, OPTConfig
from optiml_jax.fileio import barrier
from optiml_jax.run_config import resume_conflicts
from optiml_jax.train.state import TrainingError, TrainState

log = logging.getLogger(__name__)


def checkpoint_manager(workdir: str, keep: int, async_save: bool):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save_checkpoint(manager, state: TrainState, data_state: dict, force: bool = False) -> None:
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state.step))
    if manager.latest_step() == step:
        return
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        force=force,
    )


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def restore_checkpoint(manager, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
    """The latest READABLE checkpoint, restored straight into its shards, and the saved data loader state.

    Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a step
    being written when the process died is never listed. A listed step that cannot be read (a truncated
    or deleted array file, a disk error) is reported by a warning naming it, moved to
    `<workdir>/checkpoints_corrupt/<step>` (so that the step can be written again), and the previous
    one is used.
    """
    import orbax.checkpoint as ocp

    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    directory = Path(str(manager.directory))
    bad = []
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
                    ),
                )
                ok = isinstance(restored["data"], dict)
                error = None if ok else "no data loader state"
            except Exception as e:  # orbax / tensorstore raise many types for unreadable data
                ok, error = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if _all_processes_agree(ok):
                return restored["state"], restored["data"]
            log.warning(
                "checkpoint %s is unreadable or incomplete (%s); falling back to the previous checkpoint",
                directory / str(step),
                error or "unreadable on another process",
            )
            bad.append(step)
        raise TrainingError(
            f"no readable checkpoint in {directory} (tried steps {bad}); fix or remove them, or "
            f"pass --overwrite to start afresh"
        )
    finally:
        if bad:
            _quarantine(directory, bad)
            manager.reload()


def _quarantine(directory: Path, steps) -> None:
    if jax.process_index() == 0:
        target_root = directory.parent / "checkpoints_corrupt"
        target_root.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = target_root / f"{step}-{int(time.time())}"
            shutil.move(str(directory / str(step)), str(target))
            log.warning("moved the unreadable checkpoint %s to %s", directory / str(step), target)
    barrier("optiml_jax:quarantine")


# What a run writes in its workdir: everything else there belongs to someone else and is never touched.
RUN_ENTRIES = (
    "config.yaml",
    "metrics.jsonl",
    "checkpoints",
    "checkpoints_corrupt",
    "tensorboard",
    "final",
    "best",
    "eval",
)
CONFIG_NAME = "config.yaml"


def latest_checkpoint_step(workdir: Path) -> Optional[int]:
    """The largest complete checkpoint step under workdir/checkpoints (Orbax's unfinished writes are
    `<step>.orbax-checkpoint-tmp-*`, not a number), or None."""
    directory = workdir / "checkpoints"
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
    return max(steps, default=None)


def _foreign_entries(workdir: Path) -> list[str]:
    """What `workdir` holds when it is not a run's (a run writes config.yaml before anything else, then
    checkpoints); none when it is: a run only ever touches RUN_ENTRIES there, so what a user adds beside
    them stays."""
    if not workdir.is_dir() or _is_run_config(workdir / CONFIG_NAME) or has_checkpoints(workdir):
        return []
    return sorted(p.name for p in workdir.iterdir() if not p.name.endswith(".tmp"))


def _is_run_config(path: Path) -> bool:
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and {"model", "train", "workdir"} <= set(saved)


def _check_resumable(workdir: Path, config: dict) -> None:
    """ConfigError when the checkpoints in `workdir` were written under a config that changes the result."""
    saved_path = workdir / CONFIG_NAME
    if not saved_path.is_file():
        log.warning(
            "%s has checkpoints but no config.yaml: cannot check that they match this config", workdir
        )
        return
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{saved_path}: not valid YAML ({str(e).splitlines()[0]}); pass --overwrite to start afresh"
        ) from None
    conflicts = resume_conflicts(saved, config)
    if conflicts:
        raise ConfigError(
            f"{workdir} holds checkpoints of a run with a different config ({'; '.join(conflicts)}): "
            f"resuming would not give the same result; restore those settings, use another workdir, or "
            f"pass --overwrite to start afresh"
        )


def prepare_workdir(workdir: Path, config: dict, overwrite: bool) -> Optional[int]:
    """Makes `workdir` ready for the run `config` (RunConfig.to_dict()) and saves config.yaml there;
    returns the step of a run that already finished there (train.max_steps reached), writing nothing.

    A workdir holding files a run did not write is refused (ConfigError naming them); with `overwrite`
    the run goes ahead beside them unless they have the names a run writes. Checkpoints written under a
    config that changes the result are refused (ConfigError listing the keys) unless `overwrite`, which
    deletes what the old run wrote (checkpoints, metrics, TensorBoard, evaluations, final model). Every
    process checks; process 0 writes."""
    is_main = jax.process_index() == 0
    foreign = _foreign_entries(workdir)
    clashing = [name for name in foreign if name in RUN_ENTRIES]
    if foreign and (not overwrite or clashing):
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"workdir {workdir} holds files a fine-tuning run did not write ({listed}); use an empty or new "
            + (
                "workdir (a run would replace " + ", ".join(clashing) + ")"
                if clashing
                else "workdir, or pass --overwrite to write the run beside them"
            )
        )
    if overwrite:
        if is_main and not foreign:  # a run's workdir: what the run wrote goes, nothing else
            for name in RUN_ENTRIES:
                target = workdir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        barrier("optiml_jax:overwrite")
    elif has_checkpoints(workdir):
        _check_resumable(workdir, config)
        latest = latest_checkpoint_step(workdir)
        if latest >= config["train"]["max_steps"]:
            return latest
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        saved_path = workdir / CONFIG_NAME
        tmp = saved_path.with_name(CONFIG_NAME + ".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        os.replace(tmp, saved_path)
    barrier("optiml_jax:prepare_workdir")
    return None


def has_checkpoints(workdir: Path) -> bool:
    return latest_checkpoint_step(workdir) is not None


def save_final_model(
    directory: Path, opt_config: OPTConfig, params, tokenizer, extra_files: Optional[dict] = None
) -> str:
    """The trained model in our converted format (config.json + tokenizer + Orbax params), with
    `extra_files` (name -> a file on process 0) inside it when it appears."""
    save_model(directory, opt_config, params, tokenizer, overwrite=True, extra_files=extra_files)
    return str(directory)
