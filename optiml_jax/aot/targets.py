"""The machines `--aot` compiles for, and their compile-only devices on this host.

A TPU target is a topology of libtpu (`jax.experimental.topologies`, as MaxText's train_compile.py uses
it); a GPU target is a count of one GPU model, described to XLA's CUDA compiler by a target
description. The descriptions below are our own data from the vendors' published specifications; the
text they are rendered to follows the schema of XLA's `stream_executor.GpuTargetConfigProto`
(openxla/xla, Apache-2.0).

Names: `tpu:v4-64` (v4 and v5p count TensorCores, two per chip; v5e and v6e count chips),
`gpu:8xa100-80`, `gpu:1xh200`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Optional

import jax

from optiml_jax.config import ConfigError

GiB = 1024**3


class AotUnavailable(ConfigError):
    """The compiler for a target is not installed; the message names the extra that installs it."""


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str  # "tpu" or "gpu"
    hbm_bytes: int  # per device
    peak_bf16_flops: float  # per device, dense matmul
    cores_per_chip_in_name: int = 1  # v4-8 = 4 chips of 2 TensorCores (megacore: one device a chip)
    chip_config: str = "default"
    chips_per_host: tuple = (2, 2, 1)
    gpu: Optional[dict] = None  # the GpuTargetConfigProto's gpu_device_info, and its description


# TPU: HBM per chip and bf16 peak from cloud.google.com/tpu/docs/system-architecture-tpu-vm.
# usable HBM is what libtpu reports to XLA (v4: 30.75 GiB of 32).
TPU_CHIPS = {
    "v4": Chip("tpu", int(30.75 * GiB), 275e12, 2, "megacore"),
    "v5p": Chip("tpu", int(95.74 * GiB), 459e12, 2, "megacore"),
    "v5e": Chip("tpu", int(15.75 * GiB), 197e12, 1, "default", (2, 4, 1)),
    "v6e": Chip("tpu", int(31.25 * GiB), 918e12, 1, "default", (2, 4, 1)),
}


def _gpu(
    description: str,
    sms: int,
    memory: int,
    bandwidth: float,
    l2: int,
    clock_ghz: float,
    major: int,
    shared_per_sm: int,
    shared_optin: int,
    fpus_per_sm: int,
    peak_bf16: float,
) -> Chip:
    info = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 49152,
        "shared_memory_per_core": shared_per_sm,
        "threads_per_core_limit": 2048,
        "core_count": sms,
        "fpus_per_core": fpus_per_sm,
        "block_dim_limit_x": 2147483647,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": int(bandwidth),
        "l2_cache_size": l2,
        "clock_rate_ghz": clock_ghz,
        "device_memory_size": memory,
        "shared_memory_per_block_optin": shared_optin,
        "cuda_compute_capability": {"major": major},
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    return Chip("gpu", memory, peak_bf16, gpu={"info": info, "description": description})


# GPU: NVIDIA's data sheets (SMs, memory and its bandwidth, L2, boost clock, dense bf16 peak) and the CUDA
# programming guide's per-compute-capability limits (shared memory per SM and per block, opt-in).
# Memory sizes are what the driver reports as total (a little under the marketed GB).
GPU_CHIPS = {
    "a100-40": _gpu("NVIDIA A100-SXM4-40GB", 108, 42_505_273_344, 1.555e12, 40 * 2**20, 1.41, 8,
                    167_936, 166_912, 64, 312e12),
    "a100-80": _gpu("NVIDIA A100-SXM4-80GB", 108, 85_100_068_864, 2.039e12, 40 * 2**20, 1.41, 8,
                    167_936, 166_912, 64, 312e12),
    "h100": _gpu("NVIDIA H100 80GB HBM3", 132, 85_031_714_816, 3.35e12, 50 * 2**20, 1.98, 9,
                 233_472, 232_448, 128, 989e12),
    "h200": _gpu("NVIDIA H200", 132, 150_754_820_096, 4.8e12, 60 * 2**20, 1.98, 9,
                 233_472, 232_448, 128, 989e12),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given: "tpu:v4-64"
    chip_name: str  # "v4", "a100-80"
    chip: Chip
    devices: int
    topology: str  # TPU: "v4:2x4x4"; GPU: "1x1x8"

    @property
    def platform(self) -> str:
        return self.chip.kind


def _tpu_topology(generation: str, chips: int) -> str:
    """The smallest near-cubic (v4, v5p: 3-D) or near-square (v5e, v6e: 2-D) slice of `chips` chips,
    as Cloud TPU names them (v4-64 = 2x4x4, v5e-256 = 16x16)."""
    if generation in ("v4", "v5p"):
        sides = [1, 1, 1]
        for _ in range(int(math.log2(chips))):
            sides[sides.index(min(sides))] *= 2
        # ascending, with unused axes last: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4
        ordered = sorted(s for s in sides if s > 1) + [s for s in sides if s == 1]
        return f"{generation}:{'x'.join(str(s) for s in ordered)}"
    shorter = 2 ** (int(math.log2(chips)) // 2)
    return f"{generation}:{shorter}x{chips // shorter}"


def target_names() -> list[str]:
    return [f"tpu:{g}-N" for g in TPU_CHIPS] + [f"gpu:Nx{g}" for g in GPU_CHIPS]


def resolve_target(name: str) -> Target:
    """The Target of a name; ConfigError naming the accepted forms otherwise."""
    accepted = f"accepted: {', '.join(target_names())} (N a power of two)"
    tpu = re.fullmatch(r"tpu:(v4|v5p|v5e|v6e)-(\d+)", name)
    if tpu:
        chip = TPU_CHIPS[tpu[1]]
        count = int(tpu[2])
        chips = count // chip.cores_per_chip_in_name
        if chips < 1 or chips & (chips - 1) or count % chip.cores_per_chip_in_name:
            raise ConfigError(f"--aot {name}: {tpu[1]}-{count} is not a slice size; {accepted}")
        return Target(name, tpu[1], chip, chips, _tpu_topology(tpu[1], chips))
    gpu = re.fullmatch(r"gpu:(\d+)x(.+)", name)
    if gpu and gpu[2] in GPU_CHIPS and int(gpu[1]) >= 1:
        count = int(gpu[1])
        return Target(name, gpu[2], GPU_CHIPS[gpu[2]], count, f"1x1x{count}")
    raise ConfigError(f"--aot {name}: unknown target; {accepted}")


def gpu_target_config(chip: Chip) -> str:
    """The chip as a GpuTargetConfigProto in text form (what XLA's compile-only CUDA topology reads)."""

    def fields(values: dict) -> str:
        parts = []
        for key, value in values.items():
            if isinstance(value, dict):
                parts.append(f"{key} {{ {fields(value)} }}")
            else:
                parts.append(f"{key}: {value}")
        return " ".join(parts)

    return (
        f'gpu_device_info {{ {fields(chip.gpu["info"])} }} platform_name: "CUDA" '
        f'dnn_version_info {{ major: 9 minor: 8 }} device_description_str: "{chip.gpu["description"]}"'
    )


EXIT_CONFIG_ERROR = 2  # as the CLIs' (finetune.py, generate.py)
EXIT_FAILURE = 1


def host_only() -> None:
    """Compiling for a target needs no accelerator here: with libtpu or the CUDA plugin installed, jax
    would otherwise look for their hardware first (unless JAX_PLATFORMS says otherwise)."""
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


EXTRAS = {"tpu": ("libtpu", "aot-tpu"), "gpu": ("jax_plugins.xla_cuda12", "aot-gpu")}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (jax_plugins) is missing
        return False


def compile_only_devices(target: Target) -> list:
    """The target's devices, compile-only, on this host; AotUnavailable when its compiler is missing."""
    module, extra = EXTRAS[target.platform]
    if not _installed(module):
        raise AotUnavailable(
            f"--aot {target.name} needs the {target.platform.upper()} compiler: "
            f"pip install 'optiml-jax[{extra}]'"
        )
    # libtpu looks for TPU hardware and logs errors without these; compile-only devices need none
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # loaded here only: an optional, heavy dependency (libtpu / the CUDA plugin behind it)
    from jax.experimental import topologies

    if target.platform == "tpu":
        description = topologies.get_topology_desc(
            topology_name=target.topology,
            platform="tpu",
            chip_config_name=target.chip.chip_config,
            chips_per_host_bounds=target.chip.chips_per_host,
            num_slices=1,
        )
    else:
        description = topologies.get_topology_desc(
            platform="cuda", topology=target.topology, target_config=gpu_target_config(target.chip)
        )
    return list(description.devices)
