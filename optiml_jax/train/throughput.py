"""Throughput accounting: model FLOPs per trained token and the matmul peak MFU is measured against."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from optiml_jax.config import OPTConfig


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
