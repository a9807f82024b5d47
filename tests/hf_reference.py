"""Tiny random Hugging Face OPT models: the independent reference every parity test compares with."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from tiny_models import tiny_model_settings

from optiml_jax.config import OPTConfig

# Small shapes that still exercise every code path: several heads, several layers, vocab with
# "padding rows" beyond what a tokenizer would use.
TINY = tiny_model_settings(vocab_size=96, num_hidden_layers=3, ffn_dim=48)

VARIANTS = {
    "pre_ln": dict(),
    "post_ln_350m": dict(do_layer_norm_before=False, word_embed_proj_dim=16),
    "no_bias": dict(enable_bias=False),
    "no_ln_affine": dict(layer_norm_elementwise_affine=False),
    "untied_gelu": dict(tie_word_embeddings=False, activation_function="gelu"),
}


def make_config(variant: str, **overrides) -> OPTConfig:
    return OPTConfig(**{**TINY, **VARIANTS[variant], **overrides})


def make_hf_model(config: OPTConfig, seed: int = 0) -> "transformers.OPTForCausalLM":
    """A random HF model whose biases and norms are random too, so every tensor matters."""
    torch.manual_seed(seed)
    hf_config = transformers.OPTConfig(**config.to_dict(), attn_implementation="eager")
    model = transformers.OPTForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def hf_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def hf_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
            attention_mask=None
            if attention_mask is None
            else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
        )
    return out.logits.float().numpy()
