"""The README's first command, for a handful of steps: the shipped tiny model and configs/tiny.py, and
`python -m sqlm_jax.evaluate` on what it exports; then the package as a user installs it (`pip
install .`, not editable) away from the checkout: the same command from any directory, and the Colab
notebook opened on its own.

One module for all of them, so that they run one after the other on one worker: every run here
evaluates the same held-out sizes (N problems, 4 samples of each, N of the beyond set), so the
programs the first run compiles are cache hits for the others (tests/conftest.py's shared cache); so
is the update step, whose cosine schedule's length is the run's: every run here is 2 steps long."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks import get_task
from tests.tiny_models import subprocess_xla_flags

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu_demo.ipynb"

# One CPU device, as a user has, and XLA's optimised code as a user has it too: these runs decode the
# tiny config's real lengths (96 tokens, 160 for the beyond set) for several evaluations, where the
# optimised programs run ~3x faster, and each is compiled once for the module (the shared cache), so
# the optimisation passes conftest turns off for the suite's tiny programs pay here.
XLA_FLAGS = " ".join(f for f in subprocess_xla_flags().split() if "xla_backend_optimization_level" not in f)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": XLA_FLAGS}
# The held-out sets of every run here (and of evaluate): 32 problems (sampled 4 times each, the
# config's eval.sampled_n), and 32 of the beyond-the-corpus set.
N = 32
EVAL = ["--config=configs/tiny.py", f"--config.eval.num_problems={N}", f"--config.eval.second_set_problems={N}"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(workdir, completed process) of the tiny config for 2 steps from the checkout, evaluated after
    every step, run once for this module's tests."""
    workdir = tmp_path_factory.mktemp("tiny") / "run"
    out = subprocess.run(
        [sys.executable, "-m", "sqlm_jax.main", *EVAL, "--config.train.steps=2", "--config.eval.every=1",
         "--config.checkpoint.every=2", f"--config.workdir={workdir}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out


def test_tiny_config_runs_self_play_end_to_end(tiny_run):
    workdir, out = tiny_run

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["task"] == "arithmetic" and summary["steps"] == 2
    assert [e["step"] for e in summary["eval_history"]] == [0, 1, 2]
    assert 0 < summary["base_accuracy"] < 1  # the shipped model is imperfect, and not useless
    beyond = [e["eval/beyond_greedy_accuracy"] for e in summary["eval_history"]]
    assert len(beyond) == 3 and all(0 <= a < summary["base_accuracy"] for a in beyond)  # harder than the corpus's
    assert "held-out" in out.stdout and summary["export_dir"] in out.stdout

    # The proposer writes questions of the task; the solver's answers sometimes disagree, so the
    # majority-vote rewards are neither all 0 nor all 1.
    task = get_task("arithmetic", question_template="{a}*{b}")
    lines = [json.loads(line) for line in (workdir / "questions.jsonl").read_text().splitlines()]
    proposals = [p for line in lines for p in line["proposals"]]
    assert np.mean([task.parse_question(p) is not None for p in proposals]) > 0.5
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    solver = [m["reward/solver"] for m in metrics if "reward/solver" in m]
    assert len(solver) == 2 and 0 < np.mean(solver) < 1

    assert (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
    assert sorted(p.name for p in (workdir / "plots").iterdir()) == \
        ["curriculum.png", "questions_pca.png", "rewards.png"]
    model, cfg = load_pretrained(workdir / "export")
    assert cfg.architecture == "Qwen2ForCausalLM"


def test_evaluate_cli_reproduces_the_runs_final_greedy_accuracy(tiny_run, tmp_path):
    """`python -m sqlm_jax.evaluate` scores the run's export as the run's last evaluation did, and the
    README's snippet does too."""
    workdir, _ = tiny_run
    summary = json.loads((workdir / "summary.json").read_text())
    responses = tmp_path / "responses.jsonl"
    # --n=4 over eval.sampled_n=2: the flag is what is tested; 4 samples of N problems, the run's shape.
    out = subprocess.run([sys.executable, "-m", "sqlm_jax.evaluate", *EVAL, "--config.eval.sampled_n=2",
                          f"--model={workdir}/export", "--n=4", f"--output={responses}"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(records) == N and all(len(r["samples"]) == 4 for r in records)
    # The same problems, prompts and greedy decoding as the run's final evaluation.
    assert np.mean([r["greedy_score"] for r in records]) == pytest.approx(summary["final_accuracy"], abs=1e-6)
    greedy = float(re.search(r"^greedy accuracy: ([0-9.]+)", out.stdout, re.M).group(1))
    assert greedy == pytest.approx(summary["final_accuracy"], abs=1e-4)
    for metric in ("mean@4", "maj@4", "pass@4 (best@4)"):
        assert re.search(rf"^{re.escape(metric)}: [0-9.]+  \(95% bootstrap interval", out.stdout, re.M), out.stdout
    assert f"{N} held-out problems (0 dropped" in out.stdout

    # The README's snippet: the run's task options and held-out set from its summary.json.
    snippet = f"""import json
from sqlm_jax.evaluate import evaluate; from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks import get_task; from sqlm_jax.tokenizer import load_tokenizer
s = json.load(open("{workdir}/summary.json")); task = get_task(s["task"], **s["task_options"])
model, _ = load_pretrained("{workdir}/export"); tokenizer = load_tokenizer("{workdir}/export")
print(evaluate(model, tokenizer, task, task.heldout_problems(s["eval"]["num_problems"], s["eval"]["seed"]), max_new_tokens=s["eval"]["max_new_tokens"]))
"""
    readme = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert readme.returncode == 0, readme.stderr[-3000:]
    assert float(readme.stdout.split()[-1]) == pytest.approx(summary["final_accuracy"], abs=1e-6)


# ------------------------------------------------------------------------- the installed package
def _site_dirs() -> list[str]:
    """The directories the running interpreter imports installed packages from (its site-packages, a
    virtualenv's and its base's if it sees them, the user's), not the checkout."""
    return [p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")
            and os.path.isdir(p) and Path(p).resolve() != ROOT]


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory) -> Path:
    """The python of a virtualenv holding a non-editable install of this checkout. Its dependencies
    are the test environment's own, whatever interpreter runs pytest: a .pth file puts the running
    interpreter's site directories on the virtualenv's path, after its own (`--system-site-packages`
    would give the packages of the virtualenv's base interpreter instead, which lack jax when pytest
    runs from a virtualenv). No network: the checkout is built with the setuptools already here.
    .ci/run checks a fresh install with nothing else in it."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    # Plain paths, so the .pth files there are not run: the checkout's editable install stays out.
    (Path(site_packages) / "test_environment.pth").write_text("\n".join(_site_dirs()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", site_packages, str(ROOT)], check=True, capture_output=True)
    where = subprocess.run([str(python), "-c", "import jax, sqlm_jax.train; print(sqlm_jax.__file__)"], cwd=venv,
                           env=_env(), capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.startswith(str(venv)), f"the checkout, not the installed copy, was imported: {where.stdout}"
    return python


def test_the_installed_package_imports_its_dependencies(installed_python, tmp_path):
    """The virtualenv's python finds jax, flax, orbax and transformers, and this package's installed copy
    with its shipped configs, from a folder that is not the checkout."""
    out = subprocess.run([str(installed_python), "-c", "import flax, orbax.checkpoint, transformers; "
                          "from sqlm_jax import configs; print(configs.get('tiny').task)"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "arithmetic", out.stderr[-3000:]


def _env(**extra):
    return {**ENV, **extra}


def test_main_runs_a_shipped_config_from_any_directory(installed_python, tmp_path):
    out = subprocess.run(
        [str(installed_python), "-m", "sqlm_jax.main", *EVAL, "--config.train.steps=2", "--config.workdir=run"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out greedy accuracy" in out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "arithmetic" and summary["steps"] == 2
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()

    missing = subprocess.run([str(installed_python), "-m", "sqlm_jax.main", "--config=configs/nope.py"],
                             cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "error: config file 'configs/nope.py' not found; pass a path to a config file, or one of the "
        "shipped configs/NAME.py with NAME in ['algebra', 'arithmetic', 'coding', 'colab_tpu', 'tiny', 'tiny_algebra', "
        "'tiny_algebra_pretrain', 'tiny_coding', 'tiny_coding_pretrain', 'tiny_format_reward', 'tiny_pregenerated', "
        "'tiny_pretrain']"]


def test_notebook_runs_on_its_own_with_the_tiny_config(installed_python, tmp_path):
    """Top to bottom on CPU (its TPU cell skips itself), from a folder that is not the checkout."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert any("tpu" in c["metadata"].get("tags", []) for c in code), "the TPU part is tagged"
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join("".join(c["source"]) for c in code))
    env = _env(SQLM_DEMO_STEPS="2", SQLM_DEMO_WORKDIR=str(tmp_path / "run"), SQLM_DEMO_EVAL_PROBLEMS=str(N))
    out = subprocess.run([str(installed_python), str(script)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out greedy accuracy" in out.stdout
    assert "not a TPU runtime: skipped" in out.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "plots").iterdir()) == \
        ["curriculum.png", "questions_pca.png", "rewards.png"]
