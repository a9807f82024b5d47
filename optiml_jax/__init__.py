"""optiml-jax: OPT and OPT-IML in JAX/Flax.

from optiml_jax import load_pretrained, pipeline, score
from optiml_jax.generate import generate
"""

from optiml_jax.config import ConfigError, OPTConfig

__version__ = "0.1.0"

# Heavier entry points are imported on first use, so `import optiml_jax` stays cheap.
_LAZY = {
    "load_pretrained": ("optiml_jax.checkpoints.pretrained", "load_pretrained"),
    "Pretrained": ("optiml_jax.checkpoints.pretrained", "Pretrained"),
    "OPTForCausalLM": ("optiml_jax.model", "OPTForCausalLM"),
    "OPTTokenizer": ("optiml_jax.tokenizer", "OPTTokenizer"),
    # The module is `pipelines` (as in transformers): a submodule named like the function would
    # shadow this export once imported.
    "pipeline": ("optiml_jax.pipelines", "pipeline"),
    "convert": ("optiml_jax.checkpoints.convert", "convert"),
    "export_hf": ("optiml_jax.checkpoints.export", "export_hf"),
    "score": ("optiml_jax.eval.scoring", "score"),
    "Scorer": ("optiml_jax.eval.scoring", "Scorer"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'optiml_jax' has no attribute {name!r}")


__all__ = ["OPTConfig", "ConfigError", *_LAZY]
