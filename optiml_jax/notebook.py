"""What the notebooks in notebooks/ share: the runtime they run on (CPU, GPU or TPU) with the dtype,
batch and mesh picked for it, whether the Hugging Face hub is reachable, and a tiny model for offline use.

    from optiml_jax.notebook import detect_runtime
    runtime = detect_runtime()      # Runtime(platform='gpu', dtype='bfloat16', batch_size=8, mesh={...})
    cfg = load_run_config("configs/demo.yaml", runtime.run_overrides())
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from optiml_jax.checkpoints.model_format import save_model
from optiml_jax.config import ASSETS_DIR, OPTConfig
from optiml_jax.model import OPTForCausalLM
from optiml_jax.sharding import MeshConfig, make_mesh
from optiml_jax.tokenizer import OPTTokenizer

# Global fine-tuning batch per device (packed sequences): fits a 125M model at 512 tokens on any
# Colab accelerator (T4 16 GB, one TPU v2/v5e core) with float32 Adam state.
BATCH_PER_DEVICE = 8


@dataclasses.dataclass(frozen=True)
class Runtime:
    platform: str  # "cpu", "gpu" or "tpu"
    device_kind: str  # e.g. "NVIDIA A100-SXM4-40GB", "TPU v5 lite", "cpu"
    num_devices: int
    dtype: str  # compute dtype
    batch_size: int  # global fine-tuning batch
    mesh: dict  # mesh axis sizes (data, fsdp, tensor), as the run config's `mesh` section
    colab: bool

    def run_overrides(self) -> list[str]:
        """This runtime's dtype, batch and mesh as `key=value` run-config overrides."""
        return [
            f"train.compute_dtype={self.dtype}",
            f"train.batch_size={self.batch_size}",
            *(f"mesh.{axis}={size}" for axis, size in self.mesh.items()),
        ]

    def make_mesh(self):

        return make_mesh(MeshConfig(**self.mesh))


def detect_runtime() -> Runtime:
    import jax

    devices = jax.devices()
    platform, kind = devices[0].platform, devices[0].device_kind
    mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    if platform == "tpu":
        # A TPU core has 8-16 GB: shard params and Adam state over the cores (FSDP) rather than
        # replicating them, so models up to a few billion parameters fit a Colab v2-8 / v5e-8.
        dtype, mesh = "bfloat16", {"data": 1, "fsdp": -1, "tensor": 1}
    elif platform == "gpu":
        # bfloat16 needs Ampere (compute capability 8.0) or newer; a T4 (7.5) emulates it slowly.
        capability = float(getattr(devices[0], "compute_capability", "0") or 0)
        dtype = "bfloat16" if capability >= 8.0 else "float32"
    else:
        dtype = "float32"  # bfloat16 matmuls are slow on most CPUs
    return Runtime(
        platform,
        kind,
        len(devices),
        dtype,
        BATCH_PER_DEVICE * len(devices),
        mesh,
        colab="google.colab" in sys.modules,
    )


def hub_online(repo_id: str, timeout: float = 5.0) -> bool:
    """Whether `repo_id` can be fetched from the Hugging Face hub now; False at once when HF_HUB_OFFLINE
    is set, else after at most `timeout` seconds without an answer."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    ):  # huggingface_hub's reading
        return False
    try:
        from huggingface_hub import model_info

        model_info(repo_id, timeout=timeout)
        return True
    except Exception:  # no network, DNS, proxy, unknown or gated repo: all mean "use a local model"
        return False


def tiny_model(directory, preset: str = "opt-tiny", seed: int = 0) -> Path:
    """A randomly initialised model of `preset` (with the demo tokenizer) saved at `directory`: a
    stand-in to try the API offline; it writes noise until fine-tuned (see quickstart.ipynb)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    config = OPTConfig.from_preset(preset)
    model = OPTForCausalLM(config, scan_layers=True)  # one layer to compile, stored stacked anyway
    params = jax.jit(lambda rng: model.init(rng, jnp.ones((1, 8), jnp.int32))["params"])(
        jax.random.PRNGKey(seed)
    )
    tokenizer = OPTTokenizer.from_pretrained(ASSETS_DIR / "demo_tokenizer")
    return save_model(directory, config, nn.meta.unbox(params), tokenizer, overwrite=True)


__all__ = ["Runtime", "detect_runtime", "hub_online", "tiny_model", "BATCH_PER_DEVICE"]
