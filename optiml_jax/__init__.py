"""optiml-jax: OPT and OPT-IML in JAX/Flax."""
from optiml_jax.config import ConfigError, OPTConfig

__version__ = "0.1.0"
__all__ = ["OPTConfig", "ConfigError"]
