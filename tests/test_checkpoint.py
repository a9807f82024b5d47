"""save_model / restore_params: our format round-trips, restores into shards, and writes atomically."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_state_dict, make_config, make_hf_model
from jax.sharding import PartitionSpec

from optiml_jax import fileio
from optiml_jax.checkpoints import model_format as checkpoint
from optiml_jax.checkpoints.mapping import hf_to_params
from optiml_jax.fileio import OutputDirError, write_text_atomic
from optiml_jax.model import OPTForCausalLM
from optiml_jax.sharding import MeshConfig, init_params_sharded, make_mesh
from optiml_jax.tokenizer import DEMO_TOKENIZER_DIR, OPTTokenizer

CONFIG = make_config("pre_ln", hidden_size=64, num_attention_heads=4, ffn_dim=128)


def _leaves(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_numpy_params_round_trip_in_both_layouts(tmp_path):
    unstacked = hf_to_params(hf_state_dict(make_hf_model(CONFIG)), CONFIG, scan_layers=False)
    stacked = hf_to_params(hf_state_dict(make_hf_model(CONFIG)), CONFIG, scan_layers=True)
    checkpoint.save_model(tmp_path / "m", CONFIG, unstacked, OPTTokenizer.from_pretrained(DEMO_TOKENIZER_DIR))
    marker = json.loads((tmp_path / "m" / checkpoint.MARKER).read_text())
    assert marker["layout"] == "stacked_layers" and marker["num_params"] == CONFIG.num_params()
    assert (tmp_path / "m" / "vocab.json").is_file() and (tmp_path / "m" / "config.json").is_file()
    restored = checkpoint.restore_params(tmp_path / "m", OPTForCausalLM(CONFIG, scan_layers=True))
    assert _leaves(restored).keys() == _leaves(stacked).keys()
    for key, value in _leaves(stacked).items():
        np.testing.assert_array_equal(_leaves(restored)[key], value)
    restored = checkpoint.restore_params(tmp_path / "m", OPTForCausalLM(CONFIG, scan_layers=False))
    for key, value in _leaves(unstacked).items():
        np.testing.assert_array_equal(_leaves(restored)[key], value)
    # A bfloat16 model restores (casts) the float32 checkpoint.
    half = checkpoint.restore_params(tmp_path / "m", OPTForCausalLM(CONFIG, param_dtype=jnp.bfloat16))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(half))


def test_sharded_training_params_save_and_restore_onto_another_mesh(tmp_path):
    model = OPTForCausalLM(CONFIG, scan_layers=True)
    params, _ = init_params_sharded(
        model, jax.random.PRNGKey(0), make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    )
    checkpoint.save_model(tmp_path / "m", CONFIG, params)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    restored = checkpoint.restore_params(tmp_path / "m", model, mesh=mesh)
    fc1 = restored["decoder"]["layers"]["fc1"]["kernel"]  # [layers, embed, mlp]
    assert fc1.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert fc1.addressable_shards[0].data.shape == (CONFIG.num_hidden_layers, 32, 32)
    for key, value in _leaves(params).items():
        np.testing.assert_array_equal(_leaves(restored)[key], value)
    unstacked = checkpoint.restore_params(tmp_path / "m", model.clone(scan_layers=False), mesh=mesh)
    assert unstacked["decoder"]["layers_2"]["fc1"]["kernel"].sharding.spec == PartitionSpec("fsdp", "tensor")
    np.testing.assert_array_equal(unstacked["decoder"]["layers_2"]["fc1"]["kernel"], np.asarray(fc1)[2])


def test_a_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"

    def fail(*args):  # the write succeeded, the rename did not (a full disk fails earlier, the same way)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(target, "newer")
    monkeypatch.undo()
    assert target.read_text() == "new"  # the old file stays whole
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "no" / "such" / "dir.json", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary file left


def test_save_is_atomic_and_refuses_to_clobber(tmp_path):
    params = hf_to_params(hf_state_dict(make_hf_model(CONFIG)), CONFIG, scan_layers=True)
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="not empty"):
        checkpoint.save_model(target, CONFIG, params)
    broken = jax.tree_util.tree_map(lambda x: x, params)
    del broken["decoder"]["layers"]["fc2"]
    with pytest.raises(checkpoint.CheckpointError, match="fc2"):
        checkpoint.save_model(tmp_path / "other", CONFIG, broken)
    with pytest.raises(checkpoint.CheckpointError, match="fc1.*shape"):
        checkpoint.save_model(tmp_path / "other", CONFIG.replace(ffn_dim=96), params)
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (target / "notes.txt").read_text() == "keep"
    )
    checkpoint.save_model(target, CONFIG, params, overwrite=True)
    assert not (target / "notes.txt").exists() and checkpoint.is_converted_checkpoint(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # A config.json that does not match the stored arrays is a clear error.
    CONFIG.replace(ffn_dim=96).to_json_file(target / "config.json")
    with pytest.raises(checkpoint.CheckpointError, match="cannot restore params"):
        checkpoint.restore_params(target, OPTForCausalLM(CONFIG.replace(ffn_dim=96)))
