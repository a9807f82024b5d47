"""Multi-host fine-tuning: 2 local CPU processes (jax.distributed with gloo collectives, 2 devices each)
running the real CLI on one data=2 x fsdp=2 mesh over the 4 global devices give the losses and final
params of the single-process run on 4 devices; checkpoints are written and restored collectively (the
second invocation extends max_steps and resumes), only process 0 logs and writes metrics, and the final
model (checkpoint.save_model through the multi-host atomic_output_dir) loads."""

import socket
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from finetune_helpers import TASKS, cli, cli_env, config_dict, final_params, flat, step_losses

from optiml_jax.run_config import from_dict
from optiml_jax.train import train_and_evaluate
from optiml_jax.train.metrics_log import read_jsonl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(config: dict, cwd: Path) -> list[tuple[int, str, str]]:
    port = free_port()
    procs = [
        subprocess.Popen(
            cli(
                config,
                extra=("--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)),
            ),
            cwd=cwd,
            env=cli_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        out.append((proc.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_preset, tmp_path):
    # A constant lr after warmup: extending max_steps on resume then leaves the schedule unchanged.
    # eval.tasks: held-out task generation runs collectively too; only process 0 writes its files
    sections = dict(
        mesh={"data": 2, "fsdp": 2, "tensor": 1},
        optim={"schedule": "constant"},
        checkpoint={"every_steps": 2, "keep": 2, "save_final": True},
        eval={"tasks": {"data": TASKS[0], "max_instances": 6, "max_new_tokens": 4, "batch_size": 4}},
    )
    reference = train_and_evaluate(
        from_dict(config_dict(tiny_preset, tmp_path / "single", train={"max_steps": 5}, **sections)),
        devices=jax.devices()[:4],
        progress=False,
    )
    workdir = tmp_path / "multi"
    first = run_two_processes(config_dict(tiny_preset, workdir, train={"max_steps": 3}, **sections), tmp_path)
    for code, _out, err in first:
        assert code == 0, err[-3000:]
    # process 0 prints the summary, process 1 nothing of ours (gloo's C++ connection lines aside)
    assert "done: step 3" in first[0][1] and "done:" not in first[1][1] and "final model" not in first[1][1]
    assert " INFO " in first[0][2] and " INFO " not in first[1][2]  # logs from process 0 only
    assert (workdir / "checkpoints" / "3").is_dir() and (workdir / "final" / "optiml_jax.json").is_file()
    assert not list(workdir.glob(".final.tmp*"))

    second = run_two_processes(
        config_dict(tiny_preset, workdir, train={"max_steps": 5}, **sections), tmp_path
    )
    for code, _out, err in second:
        assert code == 0, err[-3000:]
    assert "resumed from" in second[0][2] and "done: step 5" in second[0][1]
    losses = step_losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(
        [losses[s] for s in range(1, 6)], [reference.losses[s] for s in range(1, 6)], atol=1e-4
    )
    got, want = final_params(workdir, tiny_preset), flat(reference.state.params)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-4, err_msg=key)
    multi_eval = read_jsonl(workdir / "eval" / "5" / "predictions.jsonl")
    single_eval = read_jsonl(tmp_path / "single" / "eval" / "5" / "predictions.jsonl")
    assert len(multi_eval) == 6 and [r["prediction"] for r in multi_eval] == [
        r["prediction"] for r in single_eval
    ]
    assert (workdir / "final" / "metrics.json").is_file() and not list((workdir / "eval").glob(".*"))
