"""Exporting what a fine-tuning run leaves to Hugging Face format: a mid-run training checkpoint
(RUN/checkpoints/STEP, params read from the train state), the run directory (its final model, or its
latest checkpoint when it has none; scanned and unscanned layers). transformers loads each export, and
its logits equal our model's on the same params, restored independently (the whole state, by Orbax)."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from finetune_helpers import TINY_MODEL, run_config

from optiml_jax import export_hf
from optiml_jax.checkpoints.model_format import CheckpointError
from optiml_jax.config import OPTConfig
from optiml_jax.model import OPTForCausalLM
from optiml_jax.train import train_and_evaluate

pytestmark = pytest.mark.slow  # one short training run (~15 s of compile and steps) shared by the module


@pytest.fixture(scope="module")
def runs(tiny_preset, tmp_path_factory):
    """A run of 4 steps (scanned layers) with checkpoints at steps 2 and 4 and a final model; and the
    workdir of an unscanned run with checkpoints at steps 0 and 3 and no final model, written by the
    loop's own functions without training (a second compile of the train step would double the cost)."""
    from optiml_jax.sharding import make_mesh
    from optiml_jax.train.checkpointing import checkpoint_manager, prepare_workdir, save_checkpoint
    from optiml_jax.train.state import build_model, create_train_state, make_optimizer

    root = tmp_path_factory.mktemp("export_runs")
    train_and_evaluate(
        run_config(
            tiny_preset,
            root / "scanned",
            train={"max_steps": 4},
            checkpoint={"every_steps": 2, "keep": 5, "save_final": True, "async_save": False},
        ),
        progress=False,
    )
    cfg = run_config(tiny_preset, root / "unscanned", train={"scan_layers": False})
    prepare_workdir(root / "unscanned", cfg.to_dict(), overwrite=False)
    tx = make_optimizer(cfg.optim, cfg.train.max_steps)
    state, _ = create_train_state(
        build_model(OPTConfig(**TINY_MODEL), cfg.train), tx, make_mesh(cfg.mesh), seed=3
    )
    manager = checkpoint_manager(str(root / "unscanned"), keep=5, async_save=False)
    save_checkpoint(manager, state, {})
    later = jax.tree_util.tree_map(lambda x: x * 1.5, state.params)
    save_checkpoint(manager, state.replace(step=state.step + 3, params=later), {})
    manager.close()
    return root / "scanned", root / "unscanned"


def checkpoint_params(step_dir):
    """The params of a training checkpoint, as Orbax restores the whole train state (numpy leaves)."""
    state_dir = (step_dir / "state").absolute()
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(state_dir).item_metadata.tree
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))["params"]


IDS = np.random.default_rng(0).integers(3, TINY_MODEL["vocab_size"], size=(2, 24))


def assert_same_logits(hf_dir, params, scan_layers):
    ours = np.asarray(
        OPTForCausalLM(OPTConfig(**TINY_MODEL), scan_layers=scan_layers).apply({"params": params}, IDS)
    )
    hf_model = transformers.OPTForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.as_tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-5)


def test_mid_run_checkpoint_exports_its_own_params(runs, tmp_path):
    scanned, _ = runs
    out = export_hf(scanned / "checkpoints" / "2", tmp_path / "hf")
    assert_same_logits(out, checkpoint_params(scanned / "checkpoints" / "2"), scan_layers=True)
    # the export is of step 2, not of the final model
    final = checkpoint_params(scanned / "checkpoints" / "4")
    step2 = checkpoint_params(scanned / "checkpoints" / "2")
    assert not np.allclose(
        final["decoder"]["embed_tokens"]["embedding"], step2["decoder"]["embed_tokens"]["embedding"]
    )
    # generation_config.json: what transformers derives from the model config for OPT
    written = json.loads((out / "generation_config.json").read_text())
    derived = transformers.GenerationConfig.from_model_config(transformers.AutoConfig.from_pretrained(out))
    assert written == {
        key: derived.to_diff_dict()[key]
        for key in ("_from_model_config", "bos_token_id", "eos_token_id", "pad_token_id")
    }
    loaded = transformers.GenerationConfig.from_pretrained(out)
    config = OPTConfig(**TINY_MODEL)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        config.bos_token_id,
        config.eos_token_id,
        config.pad_token_id,
    )
    assert transformers.AutoTokenizer.from_pretrained(out)("Input: x").input_ids[0] == config.bos_token_id


def test_run_directory_exports_its_final_model_like_the_last_checkpoint(runs, tmp_path):
    scanned, _ = runs
    from_run = export_hf(scanned, tmp_path / "run")
    assert_same_logits(from_run, checkpoint_params(scanned / "checkpoints" / "4"), scan_layers=True)
    # The final model is the last step's params: the same Hugging Face directory, file for file.
    from_step = export_hf(scanned / "checkpoints" / "4", tmp_path / "step4")
    assert sorted(p.name for p in from_run.iterdir()) == sorted(p.name for p in from_step.iterdir())
    for file in from_run.iterdir():
        assert file.read_bytes() == (from_step / file.name).read_bytes(), file.name


def test_run_without_final_model_exports_its_latest_checkpoint_unscanned_layers(runs, tmp_path):
    _, unscanned = runs
    assert sorted(p.name for p in (unscanned / "checkpoints").iterdir()) == ["0", "3"]
    out = export_hf(unscanned, tmp_path / "hf", dtype="bfloat16")
    params = checkpoint_params(unscanned / "checkpoints" / "3")
    assert "layers_0" in params["decoder"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    as_float32 = export_hf(unscanned, tmp_path / "hf32")
    assert_same_logits(as_float32, params, scan_layers=False)


def test_what_is_not_a_model_is_named(runs, tmp_path):
    scanned, _ = runs
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="neither a final model"):
        export_hf(tmp_path / "empty_run", tmp_path / "out")
    orphan = tmp_path / "orphan" / "checkpoints"
    shutil.copytree(scanned / "checkpoints" / "2", orphan / "2")
    with pytest.raises(CheckpointError, match="config.yaml is missing"):
        export_hf(orphan / "2", tmp_path / "out")
    with pytest.raises(CheckpointError, match="not an optiml_jax model directory"):
        export_hf(scanned / "checkpoints", tmp_path / "out")
    assert not (tmp_path / "out").exists()
