"""Shared by the fine-tuning tests: a tiny model, a complete small run config, and the CLI run as a user
runs it (a subprocess with N host devices)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from tiny_models import tiny_model_settings

from optiml_jax.run_config import from_dict
from optiml_jax.train.metrics_log import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SNI = REPO / "optiml_jax" / "assets" / "data" / "sni"
# The sample's eight training tasks are its SNI train-split tasks; it also ships a few test-split ones.
SNI_TRAIN_SPLIT = SNI / "splits" / "default" / "train_tasks.txt"
SNI_TEST_TASKS = ("task1154_bard_analogical_reasoning_travel", "task1664_winobias_text_generation")
TOKENIZER = REPO / "optiml_jax/assets/demo_tokenizer"
TINY_MODEL = tiny_model_settings(max_position_embeddings=128, dropout=0.1)
TASKS = [str(SNI / "task1146_country_capital.json"), str(SNI / "task1508_wordnet_antonyms.json")]


def config_dict(tiny_preset, workdir, **sections):
    data = {
        "model": f"preset:{tiny_preset}",
        "tokenizer": str(TOKENIZER),
        "workdir": str(workdir),
        "seed": 7,
        "data": {"train": TASKS},
        "train": {
            "max_steps": 4,
            "batch_size": 8,
            "seq_len": 64,
            "log_every_steps": 1,
            "peak_flops_per_device": 1e9,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "mesh": {"data": -1},
        "checkpoint": {"every_steps": 0, "keep": 2, "save_final": False},
        "eval": {"every_steps": 0, "num_samples": 0},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def run_config(tiny_preset, workdir, **sections):
    return from_dict(config_dict(tiny_preset, workdir, **sections))


def cli_overrides(config: dict) -> list[str]:
    """`key.path=value` overrides reproducing `config` on top of the demo config."""
    out = ["data.eval_holdout=null", "eval.tasks=null"]

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out.append(f"{prefix[:-1]}={json.dumps(value)}")

    walk("", config)
    return out


def flat(params):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def final_params(workdir, tiny_preset):
    from optiml_jax.checkpoints.model_format import restore_params
    from optiml_jax.config import OPTConfig
    from optiml_jax.model import OPTForCausalLM

    return flat(
        restore_params(Path(workdir) / "final", OPTForCausalLM(OPTConfig(**TINY_MODEL), scan_layers=True))
    )


def step_losses(workdir) -> dict:
    """step -> train/step_loss from metrics.jsonl, asserting that every step appears once."""
    steps = [r["step"] for r in read_jsonl(Path(workdir) / "metrics.jsonl") if "train/step_loss" in r]
    assert len(steps) == len(set(steps)), f"repeated steps in metrics.jsonl: {steps}"
    return {
        r["step"]: r["train/step_loss"]
        for r in read_jsonl(Path(workdir) / "metrics.jsonl")
        if "train/step_loss" in r
    }


def cli_env(devices: int) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def start_cli(config: dict, cwd, devices: int) -> subprocess.Popen:
    """The fine-tuning CLI on `config`, started in `cwd` with `devices` host devices; text output piped."""
    return subprocess.Popen(
        cli(config), cwd=cwd, env=cli_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def cli(config: dict, devices: int = 4, extra=()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "optiml_jax.finetune",
        "--config",
        "demo",
        *cli_overrides(config),
        "--no-progress",
        *extra,
    ]


def last_logged_step(workdir) -> int:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps)
