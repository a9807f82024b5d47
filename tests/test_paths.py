"""optiml_jax/paths.py: which model strings may go to the hub, and what a missing one says."""

import pytest

from optiml_jax.config import OPTConfig
from optiml_jax.paths import (
    ModelNotFoundError,
    looks_like_hub_id,
    preset_config,
    resolve_model_path,
    resolve_path,
)


@pytest.mark.parametrize("name", ["facebook/opt-125m", "facebook/opt-iml-max-1.3b", "models/x"])
def test_org_slash_name_looks_like_a_hub_id(name):
    assert looks_like_hub_id(name)


@pytest.mark.parametrize(
    "name",
    ["./models/x", "../x/y", "/abs/x", "~/x", "x", "a/b/c", "runs/config.json", "models/w.safetensors", "a/"],
)
def test_local_spellings_never_go_to_the_hub(name):
    assert not looks_like_hub_id(name)


def test_missing_paths_say_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"^\./models/x: no such file or directory$"):
        resolve_model_path("./models/x")
    with pytest.raises(
        ModelNotFoundError,
        match=r"^models/x: no such file or directory, and the hub could not be reached for the id 'models/x'",
    ):
        resolve_model_path("models/x")
    (tmp_path / "models" / "x").mkdir(parents=True)
    assert resolve_model_path("models/x").resolve() == tmp_path / "models" / "x"  # a local directory wins
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        resolve_model_path("file")


def test_presets_and_shipped_assets():
    assert preset_config("preset:125m") == OPTConfig.from_preset("125m")
    assert resolve_path("data/sni").endswith("assets/data/sni")
