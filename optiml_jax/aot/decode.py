"""`optiml-generate --aot TARGET --model M --batch-size B`: the decode program (prefill and loop) compiled
for a target, with the batch split over its devices and the weights whole on each (as optiml-generate
runs them), for the longest sequence the model takes: which batch fits, before renting the machine."""

from __future__ import annotations

import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from optiml_jax.aot import report as aot_report
from optiml_jax.aot.targets import compile_only_devices, resolve_target
from optiml_jax.aot.train import architecture
from optiml_jax.config import ConfigError, as_dtype
from optiml_jax.generate import (
    NEW_TOKENS_BUCKET,
    PROMPT_BUCKET,
    GenerationConfig,
    _generate_compiled,
    decode_program,
    round_up,
)
from optiml_jax.model import OPTForCausalLM
from optiml_jax.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    abstract_params,
    batch_sharding,
    make_mesh,
    replicated,
)

ADVICE = "try a smaller --batch-size, --dtype bfloat16, or a target with more devices or memory"


def compile_decode(
    model: str, target_name: str, batch_size: int, dtype: str = "bfloat16", max_new_tokens: int = 32
):
    """The report of the decode program compiled for `target_name`: per-device bytes from the compiler,
    and the weights and KV cache that make them up (prompt + new tokens = the model's positions)."""
    target = resolve_target(target_name)
    devices = compile_only_devices(target)
    config = architecture(model)
    mesh = make_mesh(MeshConfig(data=-1), devices=devices)
    if batch_size < 1 or batch_size % target.devices:
        raise ConfigError(
            f"--batch-size {batch_size} is not a multiple of the {target.devices} devices of {target.name}"
        )
    capacity = round_up(max_new_tokens, NEW_TOKENS_BUCKET)
    prompt_len = (config.max_position_embeddings - capacity) // PROMPT_BUCKET * PROMPT_BUCKET
    if prompt_len < 1:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
            f"{config.max_position_embeddings} positions"
        )
    decoder = OPTForCausalLM(
        config,
        dtype=as_dtype(dtype),
        param_dtype=as_dtype(dtype),
        scan_layers=False,
        platform=target.platform,
    )
    everywhere = replicated(mesh)
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere),
        nn.meta.unbox(abstract_params(decoder)),
    )
    itemsize = jnp.dtype(as_dtype(dtype)).itemsize
    weights = sum(x.size for x in jax.tree.leaves(params)) * itemsize
    if weights > target.chip.hbm_bytes:
        raise aot_report.DoesNotFit(
            f"{target.name}: does not fit: the weights alone are {aot_report.gib(weights)} per device, "
            f"{aot_report.gib(target.chip.hbm_bytes)} available; {ADVICE}"
        )
    rows = jax.ShapeDtypeStruct((batch_size, prompt_len), jnp.int32, sharding=batch_sharding(mesh))
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    # made on this host (the sampling scalars and the stop mask are concrete): then abstract, on the target
    arguments, settings = decode_program(decoder, params, rows, rows, generation, platform=target.platform)
    arguments = arguments[:4] + tuple(
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere) for x in arguments[4:]
    )
    refused_on = f"data={target.devices}, the weights whole on each device"
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        start = time.perf_counter()
        lowered, compiled = aot_report.compile_or_refuse(
            lambda: _generate_compiled.lower(*arguments, **settings), target, refused_on, ADVICE
        )
    sequence = prompt_len + capacity
    report = {
        "target": target.name,
        "devices": target.devices,
        "mesh": f"data={target.devices} (the batch split; weights whole on each device)",
        "batch_size": batch_size,
        "sequence": sequence,
        "compile_s": round(time.perf_counter() - start, 1),
        "per_device": aot_report.per_device_bytes(compiled, target.chip.hbm_bytes),
        "weights": weights,
        "kv_cache": 2
        * config.num_hidden_layers
        * batch_size
        // target.devices
        * sequence
        * config.hidden_size
        * itemsize,
        "custom_calls": aot_report.custom_calls(lowered),
    }
    report["fits"] = report["per_device"]["total"] <= target.chip.hbm_bytes
    report["margin"] = target.chip.hbm_bytes - report["per_device"]["total"]
    return report, target


def generate_aot(
    model: str, target_name: str, batch_size: int, dtype: str, max_new_tokens: int, report_path: Optional[str]
) -> int:
    """`optiml-generate --aot`: the exit status (0 fits; 2 a bad target or batch, a missing extra, or a
    batch that does not fit, each one line on stderr)."""

    def compiled() -> tuple[dict, str]:
        report, target = compile_decode(model, target_name, batch_size, dtype, max_new_tokens)
        gib = aot_report.gib
        lines = [
            f"compiled decoding for {aot_report.describe_target(target)} in {report['compile_s']:.1f} s: "
            f"batch {batch_size} ({batch_size // target.devices} per device) x {report['sequence']} tokens, "
            f"{dtype}",
            "per device (the compiler's figures):",
            *aot_report.memory_lines(report["per_device"]),
            f"  of which weights {gib(report['weights'])}, KV cache {gib(report['kv_cache'])}",
            f"  fits: {'yes' if report['fits'] else 'no'}, margin {gib(report['margin'])}",
        ]
        return report, "\n".join(lines)

    return aot_report.report_and_exit(compiled, report_path, ADVICE)
