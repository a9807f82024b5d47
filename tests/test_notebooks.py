"""Every notebook runs top to bottom (quick settings), as a Colab user would run it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def notebook_source(path: Path) -> str:
    """Code cells as one script; shell (`!`) and magic (`%`) lines are Colab set-up, not run here."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            lines += [line for line in "".join(cell["source"]).splitlines()
                      if not line.lstrip().startswith(("!", "%"))]
    return "\n".join(lines) + "\n"


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    env = dict(os.environ, OPTIML_NOTEBOOK_QUICK="1", OPTIML_NOTEBOOK_WORKDIR=str(tmp_path / "run"),
               XLA_FLAGS="", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-c", notebook_source(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished at step 4" in proc.stdout
    assert "generated_text" in proc.stdout
    assert "OPTForCausalLM" in proc.stdout  # the export loaded in transformers
