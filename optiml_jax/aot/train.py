"""`optiml-finetune --aot TARGET`: the run's real train step, compiled for a machine this host does not
have, and what it needs per device.

The state and batch are abstract (shapes, dtypes and shardings from the config and the model's
architecture; no weights or data are read). The step is `train.steps.make_train_step` unchanged, its
attention kernel chosen for the target's platform. Whether it fits is the compiler's figure; the
start-up estimate (train/memory.py) is shown beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Optional

import jax

from optiml_jax.aot import cudnn_stand_in
from optiml_jax.aot.report import (
    DoesNotFit,
    compile_or_refuse,
    custom_calls,
    describe_target,
    gib,
    memory_lines,
    per_device_bytes,
    report_and_exit,
)
from optiml_jax.aot.targets import Target, compile_only_devices, resolve_target
from optiml_jax.config import ConfigError, OPTConfig, as_dtype
from optiml_jax.data.packing import empty_row
from optiml_jax.model.attention import resolve_attention
from optiml_jax.model.kernels import AttentionShapes
from optiml_jax.run_config import RunConfig, resolve_path
from optiml_jax.sharding import DEFAULT_RULES, batch_sharding, make_mesh
from optiml_jax.train.memory import estimate_run
from optiml_jax.train.state import build_model, make_optimizer, state_shardings
from optiml_jax.train.steps import make_train_step
from optiml_jax.train.throughput import flops_per_token

log = logging.getLogger(__name__)

ADVICE = (
    "try more mesh.fsdp or mesh.tensor (or a larger target), more train.grad_accum_steps, "
    "train.remat_policy=full"
)


def architecture(model: str) -> OPTConfig:
    """The OPTConfig of a run's `model` without its weights: a preset, a local directory's config.json,
    or a hub id of the OPT family (facebook/opt-30b), read from the shipped presets."""
    if model.startswith("preset:"):
        name = model[len("preset:") :]
        return OPTConfig.from_preset(
            resolve_path(name) if name.endswith((".yaml", ".yml", ".json")) else name
        )
    path = Path(resolve_path(model))
    if (path / "config.json").is_file():
        return OPTConfig.from_json_file(path / "config.json")
    try:
        return OPTConfig.from_preset(model)
    except (ConfigError, FileNotFoundError, ValueError):
        raise ConfigError(
            f"model={model}: --aot needs the architecture only: a preset:NAME, a directory with "
            f"config.json, or an OPT hub id (facebook/opt-30b)"
        ) from None


def flops_per_step(config: OPTConfig, cfg: RunConfig) -> dict:
    """Analytic FLOPs of one optimizer step (the compiler's cost analysis counts a scanned layer once):
    6ND plus attention, and what the remat policy recomputes (full: one more forward pass of the layers;
    dots_no_batch: attention's einsums)."""
    per_token = flops_per_token(config, cfg.train.seq_len)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    recomputed = {
        "full": (per_token["dense"] + per_token["attention"]) / 3,
        "dots_no_batch": per_token["attention"] / 3,
    }.get(cfg.train.remat_policy, 0.0)
    return {
        "model": per_token["total"] * tokens,
        "with_remat": (per_token["total"] + recomputed) * tokens,
        "tokens": tokens,
    }


def _kernel_for(cfg: RunConfig, config: OPTConfig, target: Target) -> tuple[RunConfig, str, str]:
    """(the config to compile, the kernel's name, why): cuDNN traced with the stand-in version where
    this host has no cuDNN, or the xla kernel where the stand-in cannot work with this jax."""
    shapes = AttentionShapes(
        length=cfg.train.seq_len,
        head_dim=config.head_dim,
        dropout=(cfg.train.attention_dropout or config.attention_dropout) > 0,
    )
    try:
        spec, reason = resolve_attention(
            cfg.train.attention, target.platform, as_dtype(cfg.train.compute_dtype), shapes
        )
    except ValueError as error:
        raise ConfigError(f"train.{error}") from None
    if spec.name == "cudnn" and not cudnn_stand_in.host_has_cudnn() and not cudnn_stand_in.can_stand_in():
        reason = "cuDNN library not on this host: compiled with xla attention; memory may differ"
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, attention="xla"))
        return cfg, "xla", reason
    return cfg, spec.name, reason


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )


def _check_batch(cfg: RunConfig, mesh) -> None:
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    if micro % data_parallel or cfg.train.batch_size % cfg.train.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / train.grad_accum_steps={cfg.train.grad_accum_steps} "
            f"is not a whole number of sequences for each of the {data_parallel} data-parallel devices"
        )


def compile_train_step(cfg: RunConfig, target_name: str) -> dict:
    """Compiles the run's train step for `target_name` on compile-only devices; the report (see
    `format_train_report`). ConfigError for a bad target, mesh or batch (AotUnavailable when the
    target's compiler is not installed); DoesNotFit when the compiled step needs more than the target
    has."""
    target = resolve_target(target_name)
    devices = compile_only_devices(target)
    config = architecture(cfg.model)
    if cfg.train.attention_dropout is not None:
        config = config.replace(attention_dropout=cfg.train.attention_dropout)
    if cfg.train.seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} is longer than the model's "
            f"{config.max_position_embeddings} positions"
        )
    mesh = make_mesh(cfg.mesh, devices=devices)
    _check_batch(cfg, mesh)
    cfg, kernel, kernel_reason = _kernel_for(cfg, config, target)
    mesh_text = " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    report = {
        "target": target.name,
        "devices": target.devices,
        "mesh": mesh_text,
        "kernel": kernel,
        "kernel_reason": kernel_reason,
    }
    needs_stand_in = kernel == "cudnn" and not cudnn_stand_in.host_has_cudnn()
    start = time.perf_counter()
    with cudnn_stand_in.target_cudnn() if needs_stand_in else contextlib.nullcontext():
        lowered, compiled = _compiled_step(cfg, config, mesh, target, mesh_text)
    report["compile_s"] = round(time.perf_counter() - start, 1)
    report["per_device"] = per_device_bytes(compiled, target.chip.hbm_bytes)
    report["custom_calls"] = custom_calls(lowered)
    report["fits"] = report["per_device"]["total"] <= target.chip.hbm_bytes
    report["margin"] = target.chip.hbm_bytes - report["per_device"]["total"]
    flops = flops_per_step(config, cfg)
    report["flops_per_step"] = flops["with_remat"]
    report["model_flops_per_step"] = flops["model"]
    # at the published peak, one step cannot take less than this: MFU = seconds_at_peak / step time
    report["seconds_at_peak"] = flops["model"] / (target.devices * target.chip.peak_bf16_flops)
    report["peak_flops_per_device"] = target.chip.peak_bf16_flops
    report["estimate_total"] = estimate_run(
        cfg.train, config, dict(mesh.shape), target.platform, attention=kernel, trainable=cfg.train.trainable
    ).total
    return report


def _compiled_step(cfg: RunConfig, config: OPTConfig, mesh, target: Target, mesh_text: str):
    """The train step of `make_train_step`, compiled for the abstract state and batch; DoesNotFit
    before compiling when the state alone is over the device's memory, or when the compiler refuses."""
    rules = DEFAULT_RULES
    model = build_model(config, cfg.train, platform=target.platform)
    # the run's train.trainable, as the training loop passes it: frozen parameters hold no gradients
    # or Adam moments, so partial fine-tuning needs less than full fine-tuning
    tx = make_optimizer(cfg.optim, cfg.train.max_steps, cfg.train.trainable)
    abstract_state, shardings = state_shardings(model, tx, mesh, rules)
    state = _abstract(abstract_state, shardings)
    state_bytes = sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(state)
    )
    if state_bytes > target.chip.hbm_bytes:
        raise DoesNotFit(
            f"{target.name}: does not fit: the parameters and Adam state alone are {gib(state_bytes)} per "
            f"device, {gib(target.chip.hbm_bytes)} available ({mesh_text}); {ADVICE}"
        )
    batch = {
        key: jax.ShapeDtypeStruct(
            (cfg.train.batch_size, cfg.train.seq_len), value.dtype, sharding=batch_sharding(mesh, rules)
        )
        for key, value in empty_row(cfg.train.seq_len).items()
    }
    train_step = make_train_step(model, tx, cfg.train, cfg.optim, mesh, shardings, rules, cfg.train.trainable)
    return compile_or_refuse(lambda: train_step.lower(state, batch), target, mesh_text, ADVICE)


def format_train_report(report: dict, target: Target) -> str:
    lines = [
        f"compiled the train step for {describe_target(target)} in {report['compile_s']:.1f} s",
        f"  mesh {report['mesh']}, attention {report['kernel']} ({report['kernel_reason']})",
        "per device (the compiler's figures):",
        *memory_lines(report["per_device"]),
        f"  fits: {'yes' if report['fits'] else 'no'}, margin {gib(report['margin'])}"
        f" (the start-up estimate says {gib(report['estimate_total'])})",
        f"FLOPs per step: {report['model_flops_per_step']:.3e} (6ND + attention), "
        f"{report['flops_per_step']:.3e} with remat's recomputation",
        f"MFU = {report['seconds_at_peak']:.3f} s / step time "
        f"(at {report['peak_flops_per_device'] / 1e12:.0f} TFLOP/s bf16 per device)",
    ]
    return "\n".join(lines)


def finetune_aot(cfg: RunConfig, target_name: str, report_path: Optional[str]) -> int:
    """`optiml-finetune --aot`: the exit status (0 fits; 2 a bad target, missing extra or a step that
    does not fit, each one line on stderr)."""

    def compiled() -> tuple[dict, str]:
        report = compile_train_step(cfg, target_name)
        return report, format_train_report(report, resolve_target(target_name))

    return report_and_exit(compiled, report_path, ADVICE)
