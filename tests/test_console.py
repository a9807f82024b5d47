"""What the commands print on a terminal: each evaluation line once, the --help texts whole and under
the installed command's name."""

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tqdm import tqdm

from optiml_jax.train.context import Run

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("with_bar", [True, False])
def test_an_evaluation_line_prints_once(with_bar, capsys, caplog):
    caplog.set_level(logging.INFO, logger="optiml_jax")
    bar = tqdm(total=3, disable=not with_bar) if with_bar else None
    Run.report(SimpleNamespace(is_main=True, bar=bar), "step 2: eval loss 1.234")
    if bar is not None:
        bar.close()
    printed = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records]
    seen = (printed.out + printed.err).count("eval loss 1.234") + logged.count("step 2: eval loss 1.234")
    assert seen == 1, (printed, logged)


@pytest.mark.parametrize(
    "module, program",
    [
        ("optiml_jax.finetune", "optiml-finetune"),
        ("optiml_jax.evaluate", "optiml-evaluate"),
        ("optiml_jax.generate", "optiml-generate"),
        ("optiml_jax.convert_weights", "optiml-convert"),
        ("optiml_jax.bench", "optiml-bench"),
    ],
)
def test_help_names_the_command_and_ends_its_sentences(module, program):
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {program} "), done.stdout[:200]
    assert "python -m" not in done.stdout.splitlines()[0]
    # the description (the paragraph after the usage) ends a sentence, not mid-way
    description = done.stdout.split("\n\n")[1]
    assert description.rstrip().endswith((".", ")", ":")), description
