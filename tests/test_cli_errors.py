"""Configuration problems in every CLI (finetune, evaluate, generate, convert, lm_eval): a mesh that does not
fit the devices, a device count that does not divide the batch, a dtype outside our table. Each is one
`error: ...` line naming the setting, with exit status 2 (bad input or configuration, in every CLI), no
traceback and nothing written, and it fails before any model is loaded or compiled. One subprocess per
CLI (with N host devices: what a user sees), the other problems in-process. A write that fails on its own
(a full disk) is a runtime failure instead: one line, exit status 1."""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_helpers import TINY_MODEL, cli_overrides, config_dict

REPO = Path(__file__).resolve().parents[1]
SNI = REPO / "optiml_jax" / "assets" / "data" / "sni"


def _cli(args, devices: int, cwd: Path, timeout: int = 120, env=None):
    env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _error_line(stderr: str, *patterns: str, only_line: bool = True) -> str:
    """The one `error: ...` line (the only stderr line, unless a library logs before it) holding every
    pattern."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    if only_line:
        assert stderr.strip().splitlines() == errors, stderr
    for pattern in patterns:
        assert pattern in errors[0], (pattern, errors[0])
    return errors[0]


def _refused(args, patterns: tuple[str, ...], devices: int, cwd: Path, output: Path | None = None) -> None:
    """The CLI `args` exits 2 with one error line holding every pattern, and `output` is not created."""
    done = _cli(args, devices=devices, cwd=cwd)
    assert done.returncode == 2
    _error_line(done.stderr, *patterns)
    if output is not None:
        assert not output.exists()


# ---------------------------------------------------------------------- finetune: exit 2
def test_finetune_mesh_larger_than_the_machine(tmp_path):
    command = ["-m", "optiml_jax.finetune", "--config", "demo", "mesh.data=3", f"workdir={tmp_path / 'run'}"]
    _refused(command, ("mesh.data=3", "2 are available"), devices=2, cwd=tmp_path, output=tmp_path / "run")


@pytest.mark.parametrize(
    "override, patterns",
    [
        ("mesh.fsdp=3", ("mesh.fsdp=3", "cannot be split")),
        (
            "train.batch_size=12",
            ("train.batch_size", "12", "not divisible by the data-parallel devices", "= 8"),
        ),
        ("train.compute_dtype=float64", ("train.compute_dtype='float64'", "float32, bfloat16, float16")),
        ("train.param_dtype=int8", ("train.param_dtype='int8'",)),
    ],
)
def test_finetune_configuration_problems(override, patterns, tmp_path, capsys):
    from optiml_jax.cli.finetune import main

    assert main(["--config", "demo", override, f"workdir={tmp_path / 'run'}", "--no-progress"]) == 2
    _error_line(capsys.readouterr().err, *patterns, only_line=False)
    assert not (tmp_path / "run").exists()


def test_finetune_unknown_flag_is_one_line(capsys):
    from optiml_jax.cli.finetune import main

    assert main(["--bogus-flag"]) == 2
    _error_line(capsys.readouterr().err, "unrecognized arguments: --bogus-flag")


def test_finetune_unreadable_eval_suite_is_one_line(tiny_preset, tmp_path, capsys):
    from optiml_jax.cli.finetune import main

    suite = tmp_path / "nowhere.yaml"
    config = config_dict(tiny_preset, tmp_path / "run", eval={"every_steps": 1, "suite": str(suite)})
    assert main(["--config", "demo", *cli_overrides(config), "--no-progress"]) == 2
    _error_line(capsys.readouterr().err, str(suite), "cannot read the suite file", only_line=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------- finetune: exit 1
def test_finetune_full_disk_is_a_runtime_failure(tmp_path, capsys, monkeypatch):
    from optiml_jax.cli.finetune import main

    def full_disk(cfg, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(cfg.workdir))

    monkeypatch.setattr("optiml_jax.cli.finetune.train_and_evaluate", full_disk)
    assert main(["--config", "demo", f"workdir={tmp_path / 'run'}", "--no-progress"]) == 1
    _error_line(capsys.readouterr().err, "No space left on device", str(tmp_path / "run"), only_line=False)


# ---------------------------------------------------------------------- evaluate: exit 2
def test_evaluate_mesh_larger_than_the_machine(tmp_path):
    # --model does not exist: the mesh is checked before the model (or the data) is read
    command = [
        "-m",
        "optiml_jax.evaluate",
        "--model",
        tmp_path / "nope",
        "--data",
        SNI,
        "--mesh",
        "data=3",
        "--output",
        tmp_path / "out",
    ]
    _refused(
        command,
        ("--mesh", "mesh.data=3", "2 are available"),
        devices=2,
        cwd=tmp_path,
        output=tmp_path / "out",
    )


@pytest.mark.parametrize(
    "args, patterns",
    [
        (["--batch-size", "12"], ("--batch-size 12", "not divisible", "data x fsdp = 8")),
        (["--mesh", "data=2,fsdp=-1", "--batch-size", "4"], ("--batch-size 4", "data x fsdp = 8")),
        (["--dtype", "float64"], ("--dtype", "float64")),
    ],
)
def test_evaluate_configuration_problems(args, patterns, tmp_path, capsys):
    from optiml_jax.cli.evaluate import main

    assert (
        main(
            [
                "--model",
                str(tmp_path / "nope"),
                "--data",
                str(SNI),
                "--output",
                str(tmp_path / "out"),
                "--no-progress",
                *args,
            ]
        )
        == 2
    )
    _error_line(capsys.readouterr().err, *patterns, only_line=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--shots", "2"),
        ("--template", "tk_instruct"),
        ("--mode", "rank"),
        ("--max-instances", "5"),
        ("--max-options", "3"),
        ("--format", "jsonl"),
        ("--fields", "src=inputs"),
    ],
)
def test_evaluate_suite_refuses_the_flags_the_suite_decides(flag, value, tmp_path, capsys):
    from optiml_jax.cli.evaluate import main

    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "nope"), "--suite", str(tmp_path / "suite.yaml"), "--output", str(out)]
    assert main([*argv, flag, value]) == 2
    _error_line(capsys.readouterr().err, f"error: {flag}: ", "not used with --suite", only_line=False)
    assert not out.exists()


def test_evaluate_suite_checks_the_batch_against_the_mesh(tmp_path, capsys):
    from optiml_jax.cli.evaluate import main

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        json.dumps(
            [
                {
                    "task": "task1146_country_capital",
                    "data": str(SNI / "task1146_country_capital.json"),
                    "benchmark": "sni",
                    "category": "question_answering",
                    "level": "fully_held_out",
                    "metric": "rougeL",
                    "mode": "generate",
                }
            ]
        )
    )
    argv = ["--model", str(tmp_path / "nope"), "--suite", str(suite), "--output", str(tmp_path / "out")]
    assert main([*argv, "--batch-size", "12", "--no-progress"]) == 2
    _error_line(capsys.readouterr().err, "--batch-size 12", "data x fsdp = 8", only_line=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- generate: exit 2
def test_generate_dtype_outside_the_table(tmp_path):
    command = ["-m", "optiml_jax.generate", "--model", tmp_path, "--prompt", "hi", "--dtype", "float64"]
    _refused(command, ("--dtype", "'float64'", "float32"), devices=2, cwd=tmp_path)


def test_generate_model_config_that_cannot_run(tmp_path, capsys):
    from optiml_jax.cli.generate import main
    from optiml_jax.config import OPTConfig

    config = dict(
        OPTConfig(hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=1).to_dict(),
        num_attention_heads=5,
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["--model", str(tmp_path), "--prompt", "hi"]) == 2
    _error_line(capsys.readouterr().err, "config.json", "hidden_size=32", "num_attention_heads=5")


# ---------------------------------------------------------------------- convert: exit 2
def test_convert_dtype_outside_the_table(tmp_path):
    command = [
        "-m",
        "optiml_jax.convert_weights",
        "--input",
        tmp_path,
        "--output",
        tmp_path / "out",
        "--dtype",
        "float64",
    ]
    _refused(command, ("--dtype", "'float64'"), devices=1, cwd=tmp_path, output=tmp_path / "out")


@pytest.mark.parametrize(
    "args, patterns",
    [
        (["--to-hf", "--dtype", "fp64"], ("--dtype", "'fp64'")),
        (["--to-hf"], ("not an optiml_jax model directory", "training checkpoint", "workdir")),
        (["--config", "opt-7b"], ("unknown OPT preset 'opt-7b'",)),
        (["--to-hf", "--max-shard-size", "5XB", "--input", "{run}"], ("5XB",)),
    ],
)
def test_convert_configuration_problems(args, patterns, tmp_path, capsys):
    from optiml_jax.cli.convert import main

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "src" / "pytorch_model.bin").parent.mkdir()
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"")
    args = [a.format(run=tmp_path / "run") for a in args]
    if "--input" not in args:
        args += ["--input", str(tmp_path / "src")]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    _error_line(capsys.readouterr().err, *patterns)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- lm_eval: exit 2
@pytest.mark.slow
def test_lm_eval_mesh_larger_than_the_machine(tmp_path):
    task_dir = REPO / "tests" / "data" / "lm_eval"
    done = _cli(
        [
            "-m",
            "optiml_jax.lm_eval",
            "--model",
            "optiml_jax",
            "--model_args",
            f"pretrained={tmp_path / 'nope'},mesh=data=3",
            "--tasks",
            "optiml_test_mc",
            "--include_path",
            task_dir,
        ],
        devices=2,
        cwd=task_dir,
        timeout=900,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    _error_line(done.stderr, "model_args", "mesh.data=3", "2 are available", only_line=False)


@pytest.mark.parametrize(
    "model_args, patterns",
    [
        (dict(dtype="float64"), ("model_args", "float64", "float32, bfloat16, float16")),
        (dict(mesh="data=3"), ("model_args", "mesh.data=3", "8 are available")),
        (dict(mesh="pipeline=2"), ("model_args", "--mesh 'pipeline=2'")),
        (dict(), ("model_args", "nope", "no such file or directory")),
    ],
)
def test_lm_eval_model_args_problems(model_args, patterns, tmp_path):
    from optiml_jax.config import ConfigError
    from optiml_jax.eval.harness import OptimlJaxLM

    with pytest.raises(ConfigError) as error:
        OptimlJaxLM(pretrained=str(tmp_path / "nope"), **model_args)
    for pattern in patterns:
        assert pattern in str(error.value), (pattern, str(error.value))


# ------------------------------------------------------------- model paths and damaged models: exit 2
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny optiml_jax model directory (final/ as fine-tuning writes it), with the demo tokenizer."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from optiml_jax.checkpoints.model_format import save_model
    from optiml_jax.config import OPTConfig
    from optiml_jax.model import OPTForCausalLM

    config = OPTConfig(**TINY_MODEL)
    params = OPTForCausalLM(config).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
    tokenizer = REPO / "optiml_jax" / "assets" / "demo_tokenizer"
    return save_model(tmp_path_factory.mktemp("run") / "final", config, nn.meta.unbox(params), tokenizer)


def _damaged(model_dir: Path, tmp_path: Path, damage: str) -> tuple[Path, str]:
    """A copy of `model_dir` with `damage` done; the words its error must hold."""
    import shutil

    copy = tmp_path / "final"
    shutil.copytree(model_dir, copy)
    if damage == "params file removed":
        data_files = sorted(
            (copy / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size
        )
        data_files[-1].unlink()
        return copy, f"{copy / 'params'}: a params file is missing or damaged"
    if damage == "metadata removed":
        (copy / "params" / "_METADATA").unlink()
        return copy, "_METADATA missing"
    (copy / "optiml_jax.json").unlink()
    return copy, f"{copy / 'optiml_jax.json'}: missing"


def _without_tensorstore_thread_noise(stderr: str) -> str:
    """`stderr` without the "Event loop is closed" tracebacks that TensorStore's reader threads print
    (not raise) on a loaded machine when reads still in flight finish after Orbax's restore has failed and
    closed its event loop: printed from C++, they cannot be caught, and they come after our error line.
    Any other traceback is kept, so the one-line check still holds for ours."""
    closed = "Event loop is closed"
    lines = stderr.splitlines()
    # the threads' tracebacks may interleave line by line; any other exception keeps everything
    if any(re.match(r"\w+(Error|Exception)\b", line) and closed not in line for line in lines):
        return stderr
    # the same noise as Python reports it at exit: "Exception ignored in ...", then the error's repr
    headers = ("Traceback", " ", "Exception ignored in", "Exception in thread", "Task exception was never")
    kept = [line for line in lines if not (line.startswith(headers) or closed in line)]
    return "\n".join(kept) + "\n"


def _model_commands(model, tmp_path: Path):
    """Each command that reads a model, loading `model` (generate, evaluate, finetune)."""
    return {
        "generate": ["-m", "optiml_jax.generate", "--model", model, "--prompt", "hi"],
        "evaluate": [
            "-m",
            "optiml_jax.evaluate",
            "--model",
            model,
            "--data",
            SNI,
            "--max-instances",
            1,
            "--output",
            tmp_path / "eval",
        ],
        "finetune": [
            "-m",
            "optiml_jax.finetune",
            "--config",
            "demo",
            f"model={model}",
            "train.max_steps=1",
            f"workdir={tmp_path / 'run'}",
        ],
    }


@pytest.mark.parametrize("command", ["generate", "evaluate", "finetune"])
def test_a_missing_local_path_is_no_such_file_and_a_hub_like_one_says_both(command, tmp_path):
    for model, patterns in (
        ("./models/x", ("./models/x: no such file or directory",)),
        (
            "models/x",
            ("models/x: no such file or directory, and the hub could not be reached for the id 'models/x'",),
        ),
    ):
        env_args = _model_commands(model, tmp_path)[command]
        done = _cli(env_args, devices=1, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
        assert done.returncode == 2, done.stderr[-2000:]
        line = _error_line(done.stderr, *patterns, only_line=False)
        if model.startswith("./"):
            assert "hub" not in line
    assert not (tmp_path / "eval").exists() and not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("damage", ["params file removed", "metadata removed", "marker removed"])
@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_damaged_model_directory_names_what_is_missing(command, damage, tiny_model_dir, tmp_path):
    model, pattern = _damaged(tiny_model_dir, tmp_path, damage)
    done = _cli(_model_commands(model, tmp_path)[command], devices=1, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    stderr = _without_tensorstore_thread_noise(done.stderr)
    _error_line(stderr, pattern, only_line=False)
    assert len(stderr.strip().splitlines()) <= 3, stderr  # no traceback, no spec dump
    assert not (tmp_path / "eval").exists()


def test_the_intact_model_directory_generates(tiny_model_dir, tmp_path):
    done = _cli(_model_commands(tiny_model_dir, tmp_path)["generate"], devices=1, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
