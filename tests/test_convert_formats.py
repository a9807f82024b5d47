"""Conversion equivalence: HF -> ours -> HF is bit-identical, and every metaseq layout built from the
same weights gives the HF model's logits."""

import json
import sys
from pathlib import Path

import checkpoint_fixtures as fixtures
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_reference import hf_logits, make_config, make_hf_model

from optiml_jax.checkpoints import model_format as checkpoint
from optiml_jax.checkpoints.convert import convert
from optiml_jax.model import OPTForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_weights  # noqa: E402

VARIANTS = ["pre_ln", "post_ln_350m"]
ATOL = 1e-4


@pytest.fixture(scope="module", params=VARIANTS)
def reference(request):
    config = make_config(request.param)
    hf_model = make_hf_model(config, seed=7)
    ids = np.random.default_rng(3).integers(4, config.vocab_size, size=(2, 9))
    return config, hf_model, ids, hf_logits(hf_model, ids)


def _logits(directory, config, ids, scan_layers=True):
    model = OPTForCausalLM(config, scan_layers=scan_layers)
    params = checkpoint.restore_params(directory, model)
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids)))


def test_hf_to_ours_to_hf_is_bit_identical(reference, tmp_path):
    config, hf_model, ids, expected = reference
    source = fixtures.write_hf_dir(tmp_path / "hf", hf_model, config, "safetensors")
    tokenizer = Path(__file__).resolve().parents[1] / "optiml_jax" / "assets" / "demo_tokenizer"
    assert (
        convert_weights.main(
            ["--input", str(source), "--output", str(tmp_path / "ours"), "--tokenizer", str(tokenizer)]
        )
        == 0
    )
    marker = json.loads((tmp_path / "ours" / checkpoint.MARKER).read_text())
    assert marker["format_version"] == checkpoint.FORMAT_VERSION and marker["dtype"] == "float32"
    assert (tmp_path / "ours" / "vocab.json").is_file()
    np.testing.assert_allclose(_logits(tmp_path / "ours", config, ids), expected, atol=ATOL, rtol=0)

    # Back to HF, sharded (tiny shard limit) and whole; transformers loads both bit-identically.
    for name, limit in (("hf_sharded", "20KB"), ("hf_whole", "5GB")):
        assert (
            convert_weights.main(
                [
                    "--to-hf",
                    "--input",
                    str(tmp_path / "ours"),
                    "--output",
                    str(tmp_path / name),
                    "--max-shard-size",
                    limit,
                ]
            )
            == 0
        )
        sharded = (tmp_path / name / "model.safetensors.index.json").is_file()
        assert sharded == (name == "hf_sharded")
        assert (tmp_path / name / "vocab.json").is_file()
        reloaded = transformers.OPTForCausalLM.from_pretrained(tmp_path / name, attn_implementation="eager")
        original = hf_model.state_dict()
        for key, value in reloaded.state_dict().items():
            assert torch.equal(value, original[key]), key
        np.testing.assert_array_equal(hf_logits(reloaded.eval(), ids), expected)


@pytest.mark.parametrize(
    "layout", ["consolidated_namespace_cfg", "model_parallel_2", "fsdp_flat_mp2", "fsdp_raw_shards_mp2"]
)
def test_metaseq_layouts_match_hf_logits(reference, layout, tmp_path):
    config, hf_model, ids, expected = reference
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    source = tmp_path / "metaseq"
    if layout == "consolidated_namespace_cfg":
        path = fixtures.write_consolidated(source, state, config, namespace_cfg=True)
    elif layout == "model_parallel_2":
        path = fixtures.write_model_parallel(source, state, config, mp=2)[1]  # any one part file
    elif layout == "fsdp_flat_mp2":
        path = fixtures.write_fsdp(source, state, config, mp=2, world_size=1) and source
    else:
        path = fixtures.write_fsdp(source, state, config, mp=2, world_size=3) and source
    summary = convert(path, tmp_path / "ours", progress=False)
    assert summary.input_format == "metaseq" and summary.num_params == config.num_params()
    # The config comes from the checkpoint's own cfg (heads) and shapes.
    assert checkpoint.OPTConfig.from_json_file(tmp_path / "ours" / "config.json") == config.replace(
        dropout=0.0
    )
    np.testing.assert_allclose(_logits(tmp_path / "ours", config, ids), expected, atol=ATOL, rtol=0)


def test_metaseq_fp16_with_dict_cfg_to_bfloat16(tmp_path):
    """Half-precision metaseq input, a plain-dict cfg, bfloat16 output restored as float32."""
    config = make_config("pre_ln")
    hf_model = make_hf_model(config, seed=2)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    path = fixtures.write_consolidated(tmp_path / "m", state, config, namespace_cfg=False, dtype=np.float16)
    summary = convert(path, tmp_path / "ours", dtype="bfloat16", progress=False)
    assert summary.dtype == "bfloat16"
    ids = np.random.default_rng(0).integers(4, config.vocab_size, size=(1, 7))
    np.testing.assert_allclose(_logits(tmp_path / "ours", config, ids), hf_logits(hf_model, ids), atol=0.05)
