"""The one place `--aot` touches a private jax API: tracing cuDNN attention on a host without cuDNN.

`jax.nn.dot_product_attention(implementation="cudnn")` asks the installed cuDNN for its version while
tracing (jax._src.cudnn.fused_attention_stablehlo.check_cudnn_version, jax 0.7 to 0.10); a CPU host
compiling for a GPU target has no cuDNN, so the version the target description declares stands in for
it. Where jax moved the function, the caller falls back to the xla kernel and says so.
"""

from __future__ import annotations

import contextlib

# the dnn_version_info of targets.gpu_target_config: cuDNN 9.8
TARGET_CUDNN_VERSION = 90800


def _module():
    try:
        from jax._src.cudnn import fused_attention_stablehlo
    except ImportError:
        return None
    return fused_attention_stablehlo if hasattr(fused_attention_stablehlo, "check_cudnn_version") else None


def host_has_cudnn() -> bool:
    module = _module()
    if module is None:
        return False
    try:
        module.check_cudnn_version()
    except RuntimeError:  # "cuDNN not found"
        return False
    return True


def can_stand_in() -> bool:
    return _module() is not None


@contextlib.contextmanager
def target_cudnn():
    """While tracing for a GPU target, the cuDNN version check answers the target's version."""
    module = _module()
    original = module.check_cudnn_version
    module.check_cudnn_version = lambda: TARGET_CUDNN_VERSION
    try:
        yield
    finally:
        module.check_cudnn_version = original
