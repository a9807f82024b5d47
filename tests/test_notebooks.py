"""Every notebook runs top to bottom in a Jupyter kernel (nbclient + ipykernel), as a Colab user runs
it, in quick mode (OPTIML_NOTEBOOK_QUICK=1: tiny shapes, a few steps) and offline (HF_HUB_OFFLINE=1).
A cell error fails the test; then each notebook's key outputs are checked. The quickstart's fine-tuned
model is the tiny local model of generate.ipynb, and one JAX compilation cache serves every kernel."""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from tiny_models import tiny_model_settings

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ("quickstart.ipynb", "generate.ipynb", "finetune_and_evaluate.ipynb", "convert.ipynb")
KERNEL = "optiml-jax-tests"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """(kernel spec directory, kernel environment, scratch directory) shared by the notebooks."""
    base = tmp_path_factory.mktemp("notebooks")
    # A kernel spec naming this interpreter: the kernel imports the optiml_jax under test, whatever
    # kernel specs the machine has installed.
    spec = base / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "optiml-jax tests",
                "language": "python",
            }
        )
    )
    env = {
        **os.environ,
        "OPTIML_NOTEBOOK_QUICK": "1",
        "HF_HUB_OFFLINE": "1",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "MPLBACKEND": "Agg",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        # quickstart and finetune_and_evaluate compile the same train and eval steps: once, with
        # JAX's persistent cache (of compiles over a second; caching all of them costs more)
        "JAX_COMPILATION_CACHE_DIR": str(base / "jax-cache"),
    }
    return base / "kernels", env, base


def execute(name: str, session, **env) -> tuple[nbformat.NotebookNode, Path]:
    """Runs the notebook in a fresh kernel (raising CellExecutionError, with the cell and its
    traceback, on the first failing cell); returns the executed notebook and its workdir."""
    kernels, base_env, base = session
    workdir = base / Path(name).stem
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    km = AsyncKernelManager(
        kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(REPO)}})
    client.execute(env={**base_env, "OPTIML_NOTEBOOK_WORKDIR": str(workdir), **env})
    return nb, workdir


def text_of(nb) -> str:
    """Everything the code cells printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*([-+0-9.eE]+|nan|inf)", text)
    assert match, f"no {label!r} in the notebook's output:\n{text[-3000:]}"
    return float(match.group(1))


def jax_leaves(tree):
    import jax

    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def quickstart(session):
    return execute("quickstart.ipynb", session)


def test_every_notebook_starts_with_install_and_runtime_cells():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        code = [
            c.source for c in nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells if c.cell_type == "code"
        ]
        install, runtime = code[0], code[1]
        assert re.search(r'^REPO_URL = "https://github\.com/[^"]+/optiml-jax"', install, re.M), name
        assert "import optiml_jax" in install and re.search(
            r'^ +%pip install .*"optiml-jax @ git\+\{REPO_URL\}"', install, re.M
        )
        assert "detect_runtime()" in runtime and "OPTIML_NOTEBOOK_QUICK" in runtime, name


@pytest.mark.slow  # a kernel, JAX and a few compiles: 10-30 s
def test_quickstart(quickstart):
    nb, workdir = quickstart
    text = text_of(nb)
    assert "finished at step 4" in text
    assert re.search(r"step 4 \{'exact_match': [0-9.]+, 'rougeL': [0-9.]+, 'instances': \d+\}", text)
    assert "generated_text" in text
    assert "OPTForCausalLM" in text  # the export loaded in transformers
    assert (workdir / "hf-export" / "model.safetensors").is_file()


@pytest.mark.slow  # a kernel, JAX and a few compiles: 10-30 s
def test_generate(quickstart, session):
    _, quickstart_dir = quickstart
    nb, _ = execute("generate.ipynb", session, OPTIML_NOTEBOOK_MODEL=str(quickstart_dir / "final"))
    text = text_of(nb)
    assert f"model: {quickstart_dir / 'final'} dtype: float32" in text  # offline: the shared local model
    assert "randomly initialised" not in text
    assert text.count("pipeline: [{'generated_text': ") == 3
    assert len(re.findall(r"mean log-prob per token -?[0-9.]+", text)) == 3
    for task in (
        "task1146_country_capital",
        "task833_poem_sentiment_classification",
        "task1508_wordnet_antonyms",
    ):
        assert re.search(rf"{task} +-[0-9.]+ +\d+", text), task  # the reference answer's log-likelihood
    assert re.search(r"ranked answer: (positive|negative|mixed) \| reference: ", text)


@pytest.mark.slow  # a kernel, JAX and a few compiles: 10-30 s
def test_finetune_and_evaluate(session):
    import yaml

    from optiml_jax import load_pretrained

    nb, workdir = execute("finetune_and_evaluate.ipynb", session)
    text = text_of(nb)
    assert "done: step 4" in text
    for step, saved in ((0, "-"), (2, "yes"), (4, "yes")):  # the metrics table, a row per evaluation
        assert re.search(rf"^ +{step} +[0-9.]+ +[0-9.]+ +[0-9.]+  {saved}$", text, re.M), step
    best = int(number_after("best checkpoint: step", text))
    assert best in (2, 4)
    held_out = {"task1146_country_capital", "task833_poem_sentiment_classification"}
    trained = yaml.safe_load((workdir / "config.yaml").read_text())["data"]["train"]
    assert len(trained) == 6 and not {Path(p).stem for p in trained} & held_out
    # optiml_jax.evaluate scored the exported checkpoint on the held-out tasks only, answering as
    # the same checkpoint did inside training
    final = json.loads((workdir / "held-out-eval" / "metrics.json").read_text())
    assert set(final["per_task"]) == held_out
    predictions = [
        json.loads(line)["prediction"]
        for line in (workdir / "held-out-eval" / "predictions.jsonl").read_text().splitlines()
    ]
    during = [
        json.loads(line)["prediction"]
        for line in (workdir / "eval" / str(best) / "predictions.jsonl").read_text().splitlines()
    ]
    assert predictions == during and len(predictions) == 4
    assert f"exported step {best}: held-out EM" in text
    if best == 4:  # the last checkpoint holds the final model's weights
        exported, final_model = load_pretrained(workdir / "best-hf"), load_pretrained(workdir / "final")
        for a, b in zip(jax_leaves(exported.params), jax_leaves(final_model.params)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # a kernel, JAX and a few compiles: 10-30 s
def test_convert(session):
    nb, workdir = execute("convert.ipynb", session)
    text = text_of(nb)
    assert "converted hf checkpoint" in text and "converted metaseq checkpoint" in text
    for source in ("HF", "metaseq"):  # float32 logits against transformers' model
        assert (
            number_after(f"converted from {source} (float32): logits max diff vs transformers", text) < 1e-4
        )
    assert "the two conversions give identical logits: True" in text
    assert "original vs exported: weights identical True" in text
    assert number_after("| logits max diff", text) == 0.0  # float32 there and back: bit for bit
    assert (workdir / "hf-out" / "model.safetensors").is_file()


# ---------------------------------------------------------------------- optiml_jax.notebook
class FakeDevice:
    def __init__(self, platform, kind, compute_capability=None):
        self.platform, self.device_kind = platform, kind
        if compute_capability is not None:
            self.compute_capability = compute_capability


@pytest.mark.parametrize(
    "devices, dtype, mesh",
    [
        (
            [FakeDevice("gpu", "NVIDIA A100-SXM4-40GB", "8.0")],
            "bfloat16",
            {"data": -1, "fsdp": 1, "tensor": 1},
        ),
        ([FakeDevice("gpu", "Tesla T4", "7.5")], "float32", {"data": -1, "fsdp": 1, "tensor": 1}),
        ([FakeDevice("tpu", "TPU v5 lite")] * 8, "bfloat16", {"data": 1, "fsdp": -1, "tensor": 1}),
    ],
    ids=["a100", "t4", "tpu-v5e-8"],
)
def test_detect_runtime_on_accelerators(monkeypatch, devices, dtype, mesh):
    import jax

    from optiml_jax.notebook import detect_runtime

    monkeypatch.setattr(jax, "devices", lambda *args: devices)
    runtime = detect_runtime()
    assert (runtime.platform, runtime.dtype, runtime.mesh) == (devices[0].platform, dtype, mesh)
    assert runtime.batch_size == 8 * len(devices) and runtime.num_devices == len(devices)


def test_detect_runtime_overrides_make_a_valid_run_config():
    import jax

    from optiml_jax.notebook import detect_runtime
    from optiml_jax.run_config import load_run_config
    from optiml_jax.sharding import MeshConfig

    runtime = detect_runtime()  # the tests' 8 host devices
    assert (runtime.platform, runtime.dtype, runtime.num_devices) == ("cpu", "float32", jax.device_count())
    cfg = load_run_config("configs/demo.yaml", runtime.run_overrides())
    assert cfg.train.batch_size == 8 * jax.device_count() and cfg.train.compute_dtype == "float32"
    assert cfg.mesh == MeshConfig(data=-1, fsdp=1, tensor=1)
    assert runtime.make_mesh().shape == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


def test_hub_online_is_false_at_once_offline(monkeypatch):
    import time

    import huggingface_hub

    from optiml_jax.notebook import hub_online

    def no_network(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE is set: the hub must not be asked")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert hub_online("facebook/opt-iml-max-1.3b") is False
    assert time.perf_counter() - start < 0.5


def test_hub_online_is_false_when_the_hub_does_not_answer(monkeypatch):
    import huggingface_hub

    from optiml_jax.notebook import hub_online

    asked = []

    def unreachable(repo_id, timeout=None, **kwargs):
        asked.append((repo_id, timeout))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub_online("facebook/opt-125m", timeout=2.0) is False
    assert asked == [("facebook/opt-125m", 2.0)]


def test_tiny_model_is_a_freshly_initialised_preset(tmp_path):
    import flax.linen as nn
    import jax
    import yaml

    from optiml_jax import load_pretrained
    from optiml_jax.config import OPTConfig
    from optiml_jax.model import OPTForCausalLM
    from optiml_jax.notebook import tiny_model
    from optiml_jax.sharding import abstract_params

    preset = tmp_path / "opt-smaller.yaml"  # smaller than opt-tiny: a cheaper compile
    preset.write_text(
        # OPTConfig's default dropout, as a preset file without the key has
        yaml.safe_dump(tiny_model_settings(hidden_size=16, num_attention_heads=2, ffn_dim=32, dropout=0.1))
    )
    loaded = load_pretrained(tiny_model(tmp_path / "tiny", preset=str(preset), seed=3))
    config = OPTConfig.from_preset(str(preset))
    assert loaded.config == config and loaded.tokenizer is not None and loaded.tokenizer.vocab_size == 2048
    want = jax.tree_util.tree_leaves_with_path(
        nn.meta.unbox(abstract_params(OPTForCausalLM(config, scan_layers=True)))
    )
    got = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(loaded.params))
    assert [(path, a.shape) for path, a in got] == [(path, a.shape) for path, a in want]
    for path, array in got:  # OPT's init: N(0, init_std) weights, zero biases, unit LayerNorm scales
        name, array = jax.tree_util.keystr(path), np.asarray(array)
        if name.endswith("['bias']"):
            assert not array.any(), name
        elif name.endswith("['scale']"):
            assert (array == 1).all(), name
        else:
            assert abs(array.std() - config.init_std) < 0.2 * config.init_std and abs(array.mean()) < 0.01, (
                name
            )
