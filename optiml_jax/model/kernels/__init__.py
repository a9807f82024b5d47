"""The attention kernels, one module each (blockwise, xla, cudnn, splash, pallas_gpu), each with a
module-level `KernelSpec` named SPEC; base.py holds the spec and what the fused kernels share. A new
kernel is one new module here (and its tests): it is found by name, listed in IMPLEMENTATIONS and
asked by `auto` in its `auto_rank` order. The dispatch (`attention`, the choice) is model/attention.py.
"""

from __future__ import annotations

import importlib
import pkgutil

from optiml_jax.model.kernels.base import KERNEL_BLOCK, AttentionShapes, KernelSpec


def _find_specs() -> list[KernelSpec]:
    modules = (importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__))
    return [module.SPEC for module in modules if isinstance(getattr(module, "SPEC", None), KernelSpec)]


_specs = _find_specs()
(FALLBACK,) = [spec for spec in _specs if spec.auto_rank is None]
# In the order `auto` asks them: the ranked kernels, then the fallback (which runs everywhere).
KERNELS: dict[str, KernelSpec] = {
    spec.name: spec for spec in sorted((s for s in _specs if s is not FALLBACK), key=lambda s: s.auto_rank)
}
KERNELS[FALLBACK.name] = FALLBACK
# The names a config or a command line may ask for: auto, the fallback, then the rest as auto asks them.
IMPLEMENTATIONS = ("auto", FALLBACK.name, *(name for name in KERNELS if name != FALLBACK.name))

__all__ = ["FALLBACK", "IMPLEMENTATIONS", "KERNELS", "KERNEL_BLOCK", "AttentionShapes", "KernelSpec"]
