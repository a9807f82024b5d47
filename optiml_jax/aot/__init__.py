"""Ahead-of-time compilation for a TPU or GPU machine this host does not have (`--aot TARGET` of
optiml-finetune and optiml-generate): the real programs, their per-device memory, whether they fit."""

from optiml_jax.aot.decode import compile_decode
from optiml_jax.aot.report import DoesNotFit
from optiml_jax.aot.targets import AotUnavailable, Target, resolve_target
from optiml_jax.aot.train import compile_train_step

__all__ = ["AotUnavailable", "DoesNotFit", "Target", "compile_decode", "compile_train_step", "resolve_target"]
