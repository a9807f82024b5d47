"""What a compile for a target reports, shared by the train step and the decode loop: per-device bytes
from the compiler, whether they fit, and the report's text and JSON."""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Callable, Optional

from optiml_jax.aot.targets import EXIT_CONFIG_ERROR, EXIT_FAILURE, GiB, Target, host_only
from optiml_jax.config import ConfigError
from optiml_jax.fileio import write_text_atomic


class DoesNotFit(ConfigError):
    """The compiled program needs more memory per device than the target has; one line, with advice."""


def per_device_bytes(compiled, available: int) -> dict:
    """The compiler's figures for one device. Donated inputs alias outputs (the train state), so they
    count once."""
    stats = compiled.memory_analysis()
    argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
    temp, alias = stats.temp_size_in_bytes, stats.alias_size_in_bytes
    return {
        "argument": argument,
        "output": output,
        "temp": temp,
        "alias": alias,
        "total": argument + output + temp - alias,
        "available": available,
    }


def custom_calls(lowered) -> list[str]:
    """The custom calls of a lowered program (the fused kernels: tpu_custom_call for Pallas on TPU,
    __cudnn$fmha... for cuDNN attention), so a report shows the kernel is really in it."""
    return sorted(set(re.findall(r"custom_call @([\w$.]+)", lowered.as_text())))


def refusal_bytes(message: str) -> Optional[int]:
    """The bytes a compiler's out-of-memory refusal says the program needs, where it says so."""
    sizes = re.findall(r"([\d.]+)([KMG])\b", message)
    units = {"K": 2**10, "M": 2**20, "G": GiB}
    found = [float(value) * units[unit] for value, unit in sizes]
    return int(max(found)) if found else None


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def compile_or_refuse(lower: Callable[[], Any], target: Target, mesh_text: str, advice: str):
    """(lowered, compiled) of the program `lower()` gives; DoesNotFit, with `advice`, when the compiler
    refuses it as over the target's memory (the TPU compiler does, instead of giving figures to check)."""
    try:
        lowered = lower()
        return lowered, lowered.compile()
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        needed = refusal_bytes(str(error))
        what = (
            f"{gib(needed)} per device needed (the compiler's refusal)"
            if needed
            else "the compiler refused it"
        )
        raise DoesNotFit(
            f"{target.name}: does not fit: {what}, {gib(target.chip.hbm_bytes)} available ({mesh_text}); "
            f"{advice}"
        ) from None


def gib(value: int) -> str:
    return f"{value / GiB:.2f} GiB"


def check_fits(report: dict, advice: str) -> None:
    """DoesNotFit naming the bytes needed and available, and `advice`, when the report does not fit."""
    memory = report["per_device"]
    if report["fits"]:
        return
    raise DoesNotFit(
        f"{report['target']}: does not fit: {gib(memory['total'])} per device needed, "
        f"{gib(memory['available'])} available ({report['mesh']}); {advice}"
    )


def write_json(report: dict, path: Optional[str]) -> None:
    """The report at `path` (when given), whole or not at all; OSError when it cannot be written."""
    if path:
        write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


def report_and_exit(compiled: Callable[[], tuple[dict, str]], report_path: Optional[str], advice: str) -> int:
    """Runs `compiled` (-> the report and its text) for a CLI's --aot: prints the text, writes the JSON,
    and gives the exit status: 0 fits; 2, with one `error:` line on stderr, for a bad target, batch or
    mesh, a missing extra, or a program that does not fit; 1, with one line, when the report cannot be
    written."""
    host_only()
    try:
        report, text = compiled()
    except ConfigError as error:  # DoesNotFit and AotUnavailable included
        _error(str(error))
        return EXIT_CONFIG_ERROR
    print(text)
    try:
        write_json(report, report_path)
    except OSError as error:
        _error(f"--aot-report {report_path}: cannot write ({error.strerror or error})")
        return EXIT_FAILURE
    try:
        check_fits(report, advice)
    except DoesNotFit as error:
        _error(str(error))
        return EXIT_CONFIG_ERROR
    return 0


def describe_target(target: Target) -> str:
    return f"{target.name} ({target.devices} x {target.chip_name}, {gib(target.chip.hbm_bytes)} each)"


def memory_lines(memory: dict) -> list[str]:
    return [
        f"  {name:<10} {gib(memory[name]):>12}"
        for name in ("argument", "output", "temp", "total", "available")
    ]
