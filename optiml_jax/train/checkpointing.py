"""Training-state checkpoints: Orbax CheckpointManager saves of the whole TrainState plus the data
loader's position, restored straight into the shards, the workdir they live in, and the final model.

A checkpoint holds params, Adam state, step, the base dropout key, the non-finite counters and the data
loader position, so resuming reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import jax
import numpy as np

from optiml_jax.checkpoints.model_format import save_model
from optiml_jax.config import ConfigError, OPTConfig
from optiml_jax.fileio import barrier
from optiml_jax.run_config import RunConfig, resume_conflicts
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
    from jax.experimental import multihost_utils

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
        import shutil

        target_root = directory.parent / "checkpoints_corrupt"
        target_root.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = target_root / f"{step}-{int(time.time())}"
            shutil.move(str(directory / str(step)), str(target))
            log.warning("moved the unreadable checkpoint %s to %s", directory / str(step), target)
    barrier("optiml_jax:quarantine")


def has_checkpoints(workdir: Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def prepare_workdir(cfg: RunConfig, workdir: Path, overwrite: bool) -> None:
    """Refuses to resume under a config that changes the result (ConfigError listing the keys) unless
    `overwrite`, which clears the old run (checkpoints, metrics, TensorBoard, final model); then saves
    the resolved config as workdir/config.yaml. Every process checks; process 0 writes."""
    import shutil

    import yaml

    is_main = jax.process_index() == 0
    saved_path = workdir / "config.yaml"
    if overwrite:
        if is_main:
            for name in ("checkpoints", "checkpoints_corrupt", "tensorboard", "final"):
                shutil.rmtree(workdir / name, ignore_errors=True)
            for name in ("metrics.jsonl", "config.yaml"):
                (workdir / name).unlink(missing_ok=True)
        barrier("optiml_jax:overwrite")
    elif has_checkpoints(workdir):
        if saved_path.is_file():
            try:
                saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise ConfigError(
                    f"{saved_path}: not valid YAML ({str(e).splitlines()[0]}); pass --overwrite to "
                    f"start afresh"
                ) from None
            conflicts = resume_conflicts(saved, cfg.to_dict())
            if conflicts:
                raise ConfigError(
                    f"{workdir} holds checkpoints of a run with a different config ("
                    f"{'; '.join(conflicts)}): resuming would not give the same result; restore those "
                    f"settings, use another workdir, or pass --overwrite to start afresh"
                )
        else:
            log.warning(
                "%s has checkpoints but no config.yaml: cannot check that they match this config", workdir
            )
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = saved_path.with_name("config.yaml.tmp")
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        os.replace(tmp, saved_path)
    barrier("optiml_jax:prepare_workdir")


def save_final_model(directory: Path, opt_config: OPTConfig, params, tokenizer) -> str:
    """The trained model in our converted format (config.json + tokenizer + Orbax params)."""

    save_model(directory, opt_config, params, tokenizer, overwrite=True)
    return str(directory)
