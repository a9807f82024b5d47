"""lm-evaluation-harness: local tasks (tests/data/lm_eval) run through lm_eval with our `optiml_jax` model
and with lm_eval's own `hf` model on the Hugging Face export of the same weights: the same accuracies,
the same generations, and per-request log-likelihoods within 1e-4."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import lm_eval  # installed by the README's test command ('.[test]' includes lm_eval[hf])
import numpy as np
import pytest
from finetune_helpers import REPO, TOKENIZER
from hf_reference import make_hf_model
from tiny_models import tiny_model_settings

from optiml_jax.config import OPTConfig
from optiml_jax.tokenizer import OPTTokenizer

TASK_DIR = Path(__file__).parent / "data" / "lm_eval"
TASKS = ["optiml_test_mc", "optiml_test_gen", "optiml_test_rolling"]
# 64 positions: the rolling task's longest document takes three windows
MODEL = tiny_model_settings()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(our converted directory, its Hugging Face export): one set of random weights."""
    from optiml_jax.checkpoints.convert import convert
    from optiml_jax.checkpoints.export import export_hf

    root = tmp_path_factory.mktemp("lm_eval_models")
    make_hf_model(OPTConfig(**MODEL), seed=5).save_pretrained(root / "source")
    OPTTokenizer.from_pretrained(TOKENIZER).save_pretrained(root / "source")
    convert(root / "source", root / "ours", progress=False)
    export_hf(root / "ours", root / "export")
    return root / "ours", root / "export"


@pytest.fixture(scope="module")
def both_results(models, tmp_path_factory):
    from lm_eval.tasks import TaskManager

    import optiml_jax.lm_eval  # noqa: F401  (registers the model)

    ours_dir, export_dir = models
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
    cwd = os.getcwd()
    os.chdir(TASK_DIR)  # the task YAMLs name their data files relative to it
    try:
        manager = TaskManager(include_path=str(TASK_DIR))
        evaluate = functools.partial(
            lm_eval.simple_evaluate, tasks=TASKS, task_manager=manager, log_samples=True
        )
        ours = evaluate(model="optiml_jax", model_args=f"pretrained={ours_dir},dtype=float32", batch_size=4)
        # batch 1: lm_eval 0.4.13's hf model changes a rolling window's log-likelihood when it shares a
        # batch with windows of other context lengths (-138.91 against -142.27 alone, which is what HF
        # PyTorch gives for that window on its own)
        theirs = evaluate(
            model="hf", model_args=f"pretrained={export_dir},dtype=float32", batch_size=1, device="cpu"
        )
    finally:
        os.chdir(cwd)
    return ours, theirs


@pytest.mark.slow
def test_same_accuracies_and_loglikelihoods_as_lm_evals_hf_model(both_results):
    ours, theirs = both_results
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["optiml_test_mc"][metric] == theirs["results"]["optiml_test_mc"][metric]
    ours_mc, theirs_mc = ours["samples"]["optiml_test_mc"], theirs["samples"]["optiml_test_mc"]
    assert len(ours_mc) == 6
    for a, b in zip(ours_mc, theirs_mc):
        (ll_a, greedy_a), (ll_b, greedy_b) = (
            zip(*[r[0] for r in a["resps"]]),
            zip(*[r[0] for r in b["resps"]]),
        )
        np.testing.assert_allclose(ll_a, ll_b, atol=1e-4)
        assert greedy_a == greedy_b
    rolling_a = [s["resps"][0][0] for s in ours["samples"]["optiml_test_rolling"]]
    rolling_b = [s["resps"][0][0] for s in theirs["samples"]["optiml_test_rolling"]]
    np.testing.assert_allclose(rolling_a, rolling_b, atol=1e-4)


def test_same_generations_as_lm_evals_hf_model(both_results):
    ours, theirs = both_results
    gen_a = [s["resps"][0][0] for s in ours["samples"]["optiml_test_gen"]]
    gen_b = [s["resps"][0][0] for s in theirs["samples"]["optiml_test_gen"]]
    assert gen_a == gen_b and all(gen_a)
    assert (
        ours["results"]["optiml_test_gen"]["exact_match,none"]
        == theirs["results"]["optiml_test_gen"]["exact_match,none"]
    )


@pytest.mark.slow
def test_cli_registers_the_model_and_hands_over_to_lm_evals_cli(models, tmp_path):
    ours_dir, _ = models
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "HF_DATASETS_CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "optiml_jax.lm_eval",
            "--model",
            "optiml_jax",
            "--model_args",
            f"pretrained={ours_dir}",
            "--tasks",
            "optiml_test_mc",
            "--include_path",
            str(TASK_DIR),
            "--batch_size",
            "2",
            "--output_path",
            str(tmp_path / "out"),
        ],
        cwd=TASK_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "optiml_test_mc" in proc.stdout and "acc" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))
