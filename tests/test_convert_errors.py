"""Bad input: a one-line `error: ...` naming the file and key, a non-zero exit, and no output left."""

import json
import subprocess
import sys
from pathlib import Path

import checkpoint_fixtures as fixtures
import pytest
import torch
from hf_reference import make_config, make_hf_model
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import convert_weights  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    config = make_config("pre_ln")
    return config, make_hf_model(config, seed=1)


def _fails(capsys, workdir: Path, argv, *patterns):
    """Runs the CLI, expects exit 2 (bad input) with one stderr line matching all `patterns`, and nothing left
    in the output's parent but what was there before."""
    output = Path(argv[argv.index("--output") + 1])
    before = set(output.parent.iterdir()) if output.parent.exists() else set()
    capsys.readouterr()
    assert convert_weights.main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for pattern in patterns:
        assert pattern in lines[0], (pattern, lines[0])
    after = set(output.parent.iterdir()) if output.parent.exists() else set()
    assert after == before, f"left behind: {sorted(map(str, after - before))}"
    return lines[0]


def test_missing_input_and_missing_part(capsys, tmp_path, tiny):
    config, hf_model = tiny
    out = str(tmp_path / "out")
    _fails(capsys, tmp_path, ["--input", str(tmp_path / "nope"), "--output", out], "nope")
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    parts = fixtures.write_model_parallel(tmp_path / "mp", state, config, mp=2)
    parts[1].unlink()
    _fails(capsys, tmp_path, ["--input", str(parts[0]), "--output", out], "model part(s) [1]", "missing")


@pytest.mark.parametrize("damage", ["truncated", "corrupted_header"])
def test_damaged_safetensors(capsys, tmp_path, tiny, damage):
    config, hf_model = tiny
    source = fixtures.write_hf_dir(tmp_path / "hf", hf_model, config, "safetensors")
    weights = source / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) - 1000])
        expected = "truncated"
    else:
        weights.write_bytes(data[:8] + b"{not json" + data[17:])
        expected = "corrupted"
    _fails(
        capsys,
        tmp_path,
        ["--input", str(source), "--output", str(tmp_path / "out")],
        "model.safetensors",
        expected,
    )


def test_truncated_metaseq_part(capsys, tmp_path, tiny):
    config, hf_model = tiny
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    parts = fixtures.write_model_parallel(tmp_path / "mp", state, config, mp=2)
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) * 2 // 3])
    _fails(
        capsys,
        tmp_path,
        ["--input", str(tmp_path / "mp"), "--output", str(tmp_path / "out")],
        "model_part-1.pt",
    )


@pytest.mark.parametrize("change", ["missing", "unexpected", "wrong_shape"])
def test_key_errors_name_file_and_key(capsys, tmp_path, tiny, change):
    config, hf_model = tiny
    source = fixtures.write_hf_dir(tmp_path / "hf", hf_model, config, "safetensors")
    state = load_file(source / "model.safetensors")
    key = "model.decoder.layers.1.fc1.weight"
    if change == "missing":
        del state[key]
    elif change == "unexpected":
        state["model.decoder.layers.1.extra.weight"] = torch.zeros(3)
        key = "model.decoder.layers.1.extra.weight"
    else:
        state[key] = torch.zeros(5, 5)
    save_file(state, str(source / "model.safetensors"))
    _fails(
        capsys,
        tmp_path,
        ["--input", str(source), "--output", str(tmp_path / "out")],
        key.replace("model.", "", 1) if change == "missing" else key,
        *([] if change == "missing" else ["model.safetensors"]),
    )


def test_shape_does_not_match_config(capsys, tmp_path, tiny):
    config, hf_model = tiny
    source = fixtures.write_hf_dir(tmp_path / "hf", hf_model, config, "bin")
    config.replace(ffn_dim=64).to_json_file(source / "config.json")
    _fails(
        capsys,
        tmp_path,
        ["--input", str(source), "--output", str(tmp_path / "out")],
        "pytorch_model.bin",
        "decoder.layers.0.fc1.weight",
        "(48, 32)",
    )


def test_heads_not_inferable_without_cfg(capsys, tmp_path, tiny):
    config, hf_model = tiny
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    path = fixtures.write_consolidated(tmp_path / "m", state, config, with_cfg=False)
    line = _fails(
        capsys,
        tmp_path,
        ["--input", str(path), "--output", str(tmp_path / "out")],
        "restored.pt",
        "heads",
        "--config",
    )
    assert "cannot be inferred from tensor shapes" in line
    # With --config it converts.
    config.to_json_file(tmp_path / "config.json")
    assert (
        convert_weights.main(
            [
                "--input",
                str(path),
                "--output",
                str(tmp_path / "out"),
                "--config",
                str(tmp_path / "config.json"),
                "--no-progress",
            ]
        )
        == 0
    )


def test_existing_output_needs_overwrite(capsys, tmp_path, tiny):
    config, hf_model = tiny
    source = fixtures.write_hf_dir(tmp_path / "hf", hf_model, config, "safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, tmp_path, ["--input", str(source), "--output", str(out)], str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert (
        convert_weights.main(["--input", str(source), "--output", str(out), "--overwrite", "--no-progress"])
        == 0
    )
    assert not (out / "keep.txt").exists() and (out / "optiml_jax.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]  # no temp dirs left


def test_failure_midway_leaves_nothing(capsys, tmp_path, tiny):
    """A tensor missing from the last file is found only after everything else was staged."""
    config, hf_model = tiny
    source = fixtures.write_hf_dir(tmp_path / "hf", hf_model, config, "sharded_safetensors")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    state = load_file(source / last)
    victim = sorted(state)[-1]
    del state[victim]
    save_file(state, str(source / last))
    _fails(
        capsys,
        tmp_path,
        ["--input", str(source), "--output", str(tmp_path / "out")],
        "missing",
        victim.replace("model.", "", 1),
    )


def test_cli_process_prints_one_line_and_exits_nonzero(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_weights.py"),
            "--input",
            str(tmp_path / "missing.pt"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.pt'}: no such file or directory"
    ]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
