"""`python tools/benchmark.py device --dry-run`: every section runs on tiny shapes on CPU and lands in the
JSON file, so the one-shot run on a lent GPU machine is known to work before the machine is there."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = REPO / "tools" / "benchmark.py"


def _run(tmp_path, *args, timeout=1200):
    out = tmp_path / "device.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "device", "--json", str(out), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_dry_run_runs_every_section(tmp_path):
    figures, stdout = _run(tmp_path, "--dry-run")
    sections = figures["sections"]
    assert figures["dry_run"] and figures["speedup_vs_hf"] is None
    failed = {name: s for name, s in sections.items() if "error" in s or "skipped" in s}
    assert not failed, failed
    assert set(sections) >= {"versions", "ceilings", "decode", "load"}
    trains = [s for name, s in sections.items() if name.startswith("train:")]
    assert {(s["attention"], s["remat"], s["loss_positions"]) for s in trains} >= {
        ("auto", "dots_no_batch", "instruction"),
        ("blockwise", "dots_no_batch", "instruction"),
        ("auto", "full", "instruction"),
        ("auto", "dots_no_batch", "all"),
    }
    assert sections["versions"]["packages"]["jax"]
    assert sections["ceilings"]["matmul_tflop_s"] > 0 and sections["ceilings"]["copy_gb_s"] > 0
    for s in trains:
        assert s["median_step_s"] > 0 and s["tokens_per_s"] > 0 and s["model_flops_per_step_full"] > 0
        assert s["model_flops_per_step_causal"] < s["model_flops_per_step_full"]
        assert s["mfu_measured_matmul_causal"] > 0
        expected = 1.0 if s["loss_positions"] == "all" else 0.03
        assert s["loss_fraction"] == pytest.approx(expected, abs=0.01)
    assert trains[0]["loss"] == pytest.approx(
        trains[1]["loss"], rel=2e-2
    )  # auto and blockwise: the same step
    for batch in ("batch_1", "batch_4"):
        decode = sections["decode"][batch]
        assert decode["decode_tokens_per_s"] > 0 and decode["time_to_first_token_s"] > 0
        assert decode["achieved_gb_s"] > 0 and decode["fraction_of_copy"] > 0
    assert sections["load"]["load_pretrained_s"] > 0 and sections["load"]["checkpoint_bytes"] > 0
    assert "decode_b1_fraction_of_copy" in figures["summary"]
    assert stdout.count('{"versions"') == 1  # printed section by section as it goes


def test_sections_past_the_budget_are_skipped_not_lost(tmp_path):
    figures, _ = _run(tmp_path, "--dry-run", "--budget-s", "0", timeout=300)
    assert figures["sections"] and all("skipped" in s for s in figures["sections"].values())
