"""`optiml-finetune --aot TARGET`: the real train step compiled for TPU and GPU machines this host does not
have (compile-only devices of libtpu and of the CUDA plugin: the aot-tpu / aot-gpu extras, which the test
extra installs). The full-size compiles take minutes; their figures are in docs/finetuning.md."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import flax.linen as nn
import jax
import numpy as np
import pytest
import yaml
from finetune_helpers import TINY_MODEL
from jax.sharding import Mesh

from optiml_jax import finetune
from optiml_jax.aot import decode, targets
from optiml_jax.aot.report import DoesNotFit, report_and_exit
from optiml_jax.aot.targets import gpu_target_config, resolve_target
from optiml_jax.config import ConfigError, OPTConfig
from optiml_jax.model import OPTForCausalLM
from optiml_jax.sharding import MESH_AXES, abstract_params, logical_shardings

REPO = Path(__file__).resolve().parents[1]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_libtpu = pytest.mark.skipif(not _installed("libtpu"), reason="the aot-tpu extra (libtpu)")


@pytest.fixture(scope="session")
def cuda_plugin_path() -> str:
    """A folder to put on PYTHONPATH that holds the aot-gpu extra's CUDA plugin ("" when this interpreter
    has it). Installed there, not into the test environment: on a host without NVIDIA's libraries the
    plugin logs six lines on every `import jax`, which every one-line-error test would see (setup.cfg)."""
    if _installed("jax_plugins.xla_cuda12"):
        return ""
    folder = Path.home() / ".cache" / "optiml-jax-tests" / f"jax-cuda12-plugin-{jax.__version__}"
    if not (folder / "jax_plugins" / "xla_cuda12").is_dir():
        pins = [f"jax-cuda12-plugin=={jax.__version__}", f"jax-cuda12-pjrt=={jax.__version__}"]
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted install left
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp, *pins],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, (
            f"could not install {pins} (the package registry is needed once):\n{done.stderr}"
        )
        tmp.rename(folder)
    return str(folder)


def _aot_env() -> dict:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # other test processes may hold libtpu too
        "TPU_ACCELERATOR_TYPE": "v4-8",
        "TPU_WORKER_HOSTNAMES": "localhost",
    }
    # the program a user's run compiles: no host device count, jax's default matmul precision (the suite's
    # "highest" makes TPU float32 matmuls six bfloat16 passes: a bigger program, slower to compile)
    for name in ("XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION"):
        env.pop(name, None)
    return env


def _aot_cli(tmp_path, cli: str, *args, timeout=900, path: str = ""):
    """`python -m optiml_jax.<cli> ...` as a user runs it (`path`: more of PYTHONPATH)."""
    return subprocess.run(
        [sys.executable, "-m", f"optiml_jax.{cli}", *args],
        cwd=tmp_path,
        env={**_aot_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), path]))},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_target_names_map_to_slices_and_gpu_counts():
    assert resolve_target("tpu:v4-8").topology == "v4:2x2x1"  # 8 TensorCores = 4 chips
    assert resolve_target("tpu:v4-64").topology == "v4:2x4x4"
    assert resolve_target("tpu:v5p-128").topology == "v5p:4x4x4"
    assert resolve_target("tpu:v5e-256").topology == "v5e:16x16"
    assert resolve_target("tpu:v6e-8").topology == "v6e:2x4"
    h200 = resolve_target("gpu:1xh200")
    assert (h200.devices, h200.topology, h200.platform) == (1, "1x1x1", "gpu")
    text = gpu_target_config(resolve_target("gpu:8xa100-80").chip)
    assert "core_count: 108" in text and "cuda_compute_capability { major: 8 }" in text
    for bad in ("tpu:v4-12", "gpu:8xv100", "v4-8"):
        with pytest.raises(ConfigError, match="accepted: tpu:v4-N"):
            resolve_target(bad)


def test_without_the_extra_aot_is_one_line_naming_it(monkeypatch, capsys):
    monkeypatch.setattr(targets, "_installed", lambda module: False)
    assert finetune.main(["--config", "demo", "--aot", "tpu:v4-8"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --aot tpu:v4-8 needs the TPU compiler: pip install 'optiml-jax[aot-tpu]'"
    )
    assert finetune.main(["--config", "demo", "--aot", "gpu:8xh100"]) == 2
    assert "pip install 'optiml-jax[aot-gpu]'" in capsys.readouterr().err


def test_decoding_the_compiler_refuses_is_one_line_not_a_traceback(monkeypatch, capsys):
    """The TPU compiler refuses a program over HBM with an error rather than figures: decoding's compile
    turns it into the same one line as the train step's (no TPU compiler needed: the refusal is stubbed)."""
    refusal = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
        "Used 40.50G of 30.75G hbm. Exceeded hbm capacity by 9.75G."
    )

    class Lowered:
        def compile(self):
            raise refusal

    monkeypatch.setattr(decode, "compile_only_devices", lambda target: jax.devices()[: target.devices])
    monkeypatch.setattr(decode, "_generate_compiled", SimpleNamespace(lower=lambda *a, **k: Lowered()))
    with pytest.raises(DoesNotFit, match=r"tpu:v4-8: does not fit: 40.50 GiB per device needed"):
        decode.compile_decode("preset:tiny", "tpu:v4-8", 8)
    assert decode.generate_aot("preset:tiny", "tpu:v4-8", 8, "bfloat16", 32, None) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: tpu:v4-8: does not fit: 40.50 GiB") and "--batch-size" in err
    monkeypatch.setattr(decode, "_generate_compiled", SimpleNamespace(lower=lambda *a, **k: 1 / 0))
    with pytest.raises(ZeroDivisionError):  # any other failure is not a refusal
        decode.compile_decode("preset:tiny", "tpu:v4-8", 8)


@pytest.mark.parametrize("where", ["no_such_dir/report.json", "a_directory"])
def test_a_report_that_cannot_be_written_is_one_line_and_exit_1(tmp_path, capsys, where):
    (tmp_path / "a_directory").mkdir()
    memory = {"argument": 1, "output": 1, "temp": 1, "alias": 0, "total": 3, "available": 4}
    report = {"target": "tpu:v4-8", "mesh": "data=4", "per_device": memory, "fits": True}
    path = str(tmp_path / where)
    assert report_and_exit(lambda: (report, "compiled"), path, "advice") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --aot-report {path}: cannot write ("), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_directory"]  # nothing half-written beside it
    assert not any((tmp_path / "a_directory").iterdir())
    written = tmp_path / "report.json"
    assert report_and_exit(lambda: (report, "compiled"), str(written), "advice") == 0
    assert json.loads(written.read_text()) == report


# Every minor dimension of every shard a multiple of TPU's 128-wide tiles (hidden 512 over fsdp 4, head
# dim 128; positions 510 + OPT's offset of 2): the compiler's argument bytes are then the arrays' own,
# with XLA's 512-byte minimum for the scalars.
TILED_MODEL = dict(
    TINY_MODEL, hidden_size=512, num_attention_heads=4, ffn_dim=512, max_position_embeddings=510
)


def _shard_bytes(tree, mesh_shape: dict) -> list[int]:
    """Bytes of one device's shard of every leaf, from shapes and the rules on a host mesh of that shape."""
    devices = np.asarray(jax.devices()[: math.prod(mesh_shape.values())])
    mesh = Mesh(devices.reshape(tuple(mesh_shape[a] for a in MESH_AXES)), MESH_AXES)
    shardings = jax.tree.leaves(logical_shardings(tree, mesh))
    leaves = jax.tree.leaves(nn.meta.unbox(tree))
    return [math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for s, x in zip(shardings, leaves)]


@needs_libtpu
def test_model_compiled_for_tpu_v4_8(tmp_path):
    preset = tmp_path / "opt-tiled.yaml"
    preset.write_text(yaml.safe_dump(TILED_MODEL))
    report_path = tmp_path / "report.json"
    result = _aot_cli(
        tmp_path,
        "finetune", "--config", "demo", f"model=preset:{preset}", "train.batch_size=16", "train.seq_len=256",
        "mesh.data=1", "mesh.fsdp=4", "--aot", "tpu:v4-8", "--aot-report", report_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    keys = {"target", "devices", "mesh", "per_device", "fits", "compile_s", "flops_per_step", "kernel"}
    assert keys <= set(report)
    assert (report["target"], report["devices"], report["fits"]) == ("tpu:v4-8", 4, True)
    assert report["mesh"] == "data=1 x fsdp=4 x tensor=1"
    # the splash kernel (a Pallas TPU custom call) is in the program, not our XLA attention
    assert report["kernel"] == "splash" and "tpu_custom_call" in report["custom_calls"]
    # arguments: one device's shard of the float32 params and of Adam's two float32 moments, the batch
    # and the scalars (step, two non-finite counters, two optimizer counts, the uint32[2] key)
    params = sum(
        _shard_bytes(
            abstract_params(OPTForCausalLM(OPTConfig.from_dict(TILED_MODEL))),
            {"data": 1, "fsdp": 4, "tensor": 1},
        )
    )
    batch = 5 * (16 // 4) * 256 * 4  # 5 int32/float32 [16, 256] inputs, rows split over 4 devices
    assert report["per_device"]["argument"] == 3 * params + batch + 6 * 512
    assert report["per_device"]["total"] <= report["per_device"]["available"] == int(30.75 * 2**30)
    assert "fits: yes" in result.stdout and "MFU = " in result.stdout


@needs_libtpu
def test_30b_on_a_slice_it_cannot_fit_is_refused_in_one_line(tmp_path):
    result = _aot_cli(tmp_path, "finetune", "--config", "optiml-30b", "--aot", "tpu:v4-8")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "tpu:v4-8: does not fit" in errors[0] and "30.75 GiB available" in errors[0]
    assert "mesh.fsdp" in errors[0] and "grad_accum_steps" in errors[0] and "remat" in errors[0]


@needs_libtpu
def test_frozen_embeddings_are_sized_as_the_run_trains_them(tmp_path):
    """train.trainable reaches the compiled step and the estimate beside it: frozen embeddings hold no
    Adam moments, so the step's arguments and the estimate are smaller than full fine-tuning's."""
    script = (
        "import json, sys\n"
        "from optiml_jax.aot.train import compile_train_step\n"
        "from optiml_jax.run_config import load_run_config\n"
        "reports = {}\n"
        "for name, trainable in (('full', 'null'), ('frozen', '^(?!.*embed_)')):\n"
        "    cfg = load_run_config('demo', ['train.seq_len=128', f'train.trainable={trainable}'])\n"
        "    report = compile_train_step(cfg, 'tpu:v4-8')\n"
        "    reports[name] = {'argument': report['per_device']['argument'], "
        "'estimate': report['estimate_total']}\n"
        "print(json.dumps(reports))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**_aot_env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    full, frozen = reports["full"], reports["frozen"]
    assert frozen["argument"] < full["argument"], reports
    assert frozen["estimate"] < full["estimate"], reports


def test_tiny_model_compiled_for_8_h100(tmp_path, cuda_plugin_path):
    report_path = tmp_path / "report.json"
    result = _aot_cli(
        tmp_path,
        "finetune", "--config", "demo", "train.compute_dtype=bfloat16", "--aot", "gpu:8xh100",
        "--aot-report", report_path, path=cuda_plugin_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert (report["devices"], report["mesh"], report["fits"]) == (8, "data=8 x fsdp=1 x tensor=1", True)
    assert report["kernel"] == "cudnn"
    assert any(call.startswith("__cudnn$fmha") for call in report["custom_calls"]), report["custom_calls"]
    assert 0 < report["per_device"]["total"] < report["per_device"]["available"]


@needs_libtpu
def test_decoding_compiled_for_tpu_v4_8_and_a_batch_that_cannot_fit(tmp_path):
    report_path = tmp_path / "decode.json"
    result = _aot_cli(
        tmp_path,
        "generate",
        "--model",
        "preset:tiny",
        "--aot",
        "tpu:v4-8",
        "--batch-size",
        "8",
        "--aot-report",
        report_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    config = OPTConfig.from_preset("tiny")
    assert (report["devices"], report["batch_size"], report["fits"]) == (4, 8, True)
    assert report["sequence"] == config.max_position_embeddings  # prompt + new tokens: every position
    # float32 keys and values of every layer for 2 rows per device
    assert (
        report["kv_cache"] == 2 * config.num_hidden_layers * 2 * report["sequence"] * config.hidden_size * 4
    )
    assert report["weights"] == config.num_params() * 4
    assert report["per_device"]["total"] >= report["kv_cache"]
    assert "fits: yes" in result.stdout
    refused = _aot_cli(
        tmp_path, "generate", "--model", "preset:30b", "--aot", "tpu:v4-8", "--batch-size", "4"
    )
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "tpu:v4-8: does not fit" in errors[0] and "--batch-size" in errors[0]
