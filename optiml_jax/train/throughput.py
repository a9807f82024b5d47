"""Throughput accounting: model FLOPs per trained token and the matmul peak MFU is measured against."""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp

from optiml_jax.config import OPTConfig, as_dtype
from optiml_jax.run_config import TrainSection

log = logging.getLogger(__name__)


def flops_per_token(config: OPTConfig, seq_len: int) -> dict:
    """Model FLOPs per trained token (forward + backward = 3 x forward, no remat counted):
    6 N_nonembedding (weight matmuls) + 6 d V (the tied LM head) + 12 L S d (attention scores and
    values, the labelled "attention" term)."""
    dense = 6 * config.num_params(include_embeddings=False)
    head = 6 * config.word_embed_proj_dim * config.vocab_size
    attention = 12 * config.num_hidden_layers * seq_len * config.hidden_size
    return {"dense": dense, "lm_head": head, "attention": attention, "total": dense + head + attention}


def measure_matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5, device=None) -> float:
    """FLOP/s of a large square matmul on one device: the roofline MFU is measured against."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def run_throughput(train: TrainSection, config: OPTConfig, devices: int) -> dict:
    """What a run's tokens/s and MFU are computed from (logged once by process 0): FLOPs per token, the
    peak of all `devices` (train.peak_flops_per_device, or a measured matmul) and tokens per step."""
    flops = flops_per_token(config, train.seq_len)
    peak = train.peak_flops_per_device or measure_matmul_peak(as_dtype(train.compute_dtype))
    if jax.process_index() == 0:
        log.info(
            "model: %s parameters (%s without embeddings); %.3g FLOPs/token (attention %.3g); peak %.3g "
            "FLOP/s per device",
            f"{config.num_params():,}",
            f"{config.num_params(include_embeddings=False):,}",
            flops["total"],
            flops["attention"],
            peak,
        )
    return {
        "flops_per_token": flops["total"],
        "peak_flops": peak * devices,
        "tokens_per_step": train.batch_size * train.seq_len,
    }
