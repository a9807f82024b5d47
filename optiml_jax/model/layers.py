"""The model's numerical building blocks with hand-written gradients: LayerNorm, the ReLU, the activation
table, and the parameter initialisers that carry logical axis names (see sharding.py)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from optiml_jax.config import ConfigError

Dtype = Any


@jax.custom_vjp
def _relu(x):
    return jnp.maximum(x, 0)


def _relu_vjp_forward(x):
    out = _relu(x)
    # The output is kept anyway (fc2's weight gradient reads it) and tells where the input was
    # positive: jax.nn.relu's gradient kept a separate boolean mask the size of the MLP activations.
    return out, out


def _relu_vjp_backward(out, d_out):
    return (jnp.where(out > 0, d_out, jnp.zeros_like(d_out)),)


_relu.defvjp(_relu_vjp_forward, _relu_vjp_backward)

ACTIVATIONS = {
    "relu": _relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    """The activation function of a config's `activation_function`; ConfigError naming it otherwise."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"OPTConfig.activation_function={name!r} is not one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def init_normal(stddev: float, axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def init_zeros(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def init_ones(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics in float32 (mean, then the variance about it, as
    PyTorch). Parameters `scale` and `bias`, as flax's nn.LayerNorm.

    Its backward pass (`_normalize_vjp_backward`) keeps only the input and two numbers per row and
    recomputes the normalised values: autodiff of the plain formula kept three more activations of
    the input's size per LayerNorm, which under `nn.scan` are stacked, zero-filled and copied per layer.
    """

    epsilon: float
    affine: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        if self.affine:
            scale = self.param("scale", init_ones(("embed",)), features, self.param_dtype)
            bias = self.param("bias", init_zeros(("embed",)), features, self.param_dtype)
        else:
            scale, bias = jnp.ones(features, jnp.float32), jnp.zeros(features, jnp.float32)
        return _normalize(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x, scale, bias, epsilon, dtype):
    return _normalize_vjp_forward(x, scale, bias, epsilon, dtype)[0]


def _normalize_vjp_forward(x, scale, bias, epsilon, dtype):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    inv_std = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + epsilon)
    out = centered * inv_std * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(dtype), (x, mean, inv_std, scale, bias)


def _normalize_vjp_backward(epsilon, dtype, residuals, d_out):
    x, mean, inv_std, scale, bias = residuals
    normalized = (x.astype(jnp.float32) - mean) * inv_std
    d_out = d_out.astype(jnp.float32)
    rows = tuple(range(d_out.ndim - 1))
    d_scale = jnp.sum(d_out * normalized, axis=rows)
    d_bias = jnp.sum(d_out, axis=rows)
    d_normalized = d_out * scale.astype(jnp.float32)
    d_x = inv_std * (
        d_normalized
        - jnp.mean(d_normalized, axis=-1, keepdims=True)
        - normalized * jnp.mean(d_normalized * normalized, axis=-1, keepdims=True)
    )
    return d_x.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_normalize.defvjp(_normalize_vjp_forward, _normalize_vjp_backward)
