"""The Colab notebook runs top to bottom on CPU with the tiny config (its TPU cell skips itself)."""
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu_demo.ipynb"


def test_notebook_runs_on_cpu_with_the_tiny_config(tmp_path):
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert any("tpu" in c["metadata"].get("tags", []) for c in code), "the TPU part is tagged"
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join("".join(c["source"]) for c in code))
    env = {**os.environ, "SQLM_DEMO_STEPS": "2", "SQLM_DEMO_WORKDIR": str(tmp_path / "run"),
           "SQLM_DEMO_EVAL_PROBLEMS": "64",
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out greedy accuracy" in out.stdout
    assert "not a TPU runtime: skipped" in out.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "plots").iterdir()) == \
        ["curriculum.png", "questions_pca.png", "rewards.png"]
