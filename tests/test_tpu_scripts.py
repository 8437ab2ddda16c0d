"""tpu/*.sh: shellcheck-clean, --dry-run prints exactly the gcloud commands a real run executes, usage
errors are clear, and the commands launch.sh and stop.sh send to the workers work (run here, locally)."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from packaging.requirements import Requirement

TPU = Path(__file__).resolve().parents[1] / "tpu"
SCRIPTS = sorted(p.name for p in TPU.glob("*.sh") if p.name != "common.sh")
BASE = ["--name=sqlm", "--zone=us-west4-a"]
ARGS = {  # script -> arguments for a full dry run
    "create.sh": BASE + ["--accelerator-type=v5litepod-8", "--spot"],
    "setup.sh": BASE,
    "launch.sh": BASE + ["--config=configs/algebra.py", "--workdir=gs://bucket/algebra"],
    "logs.sh": BASE,
    "stop.sh": BASE,
    "delete.sh": BASE,
}
FAKE_GCLOUD = f"""#!{sys.executable}
# Records each call (and the file names of any .tgz it is handed) instead of reaching Google Cloud.
import json, os, sys, tarfile
entry = {{"argv": ["gcloud"] + sys.argv[1:]}}
for arg in sys.argv[1:]:
    if arg.endswith(".tgz") and os.path.isfile(arg):
        entry["archive"] = tarfile.open(arg).getnames()
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(entry) + "\\n")
"""


@pytest.fixture
def gcloud(tmp_path):
    """A PATH whose `gcloud` only records its calls; returns (env, read_calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_GCLOUD_LOG=str(log), TMPDIR=str(tmp_path))

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


def _run(script, args, env, **kw):
    return subprocess.run(["bash", str(TPU / script), *args], env=env, capture_output=True, text=True,
                          timeout=60, **kw)


def _dry_run(script, args, env) -> list[list[str]]:
    """The commands `script --dry-run` prints, each split back into words as a shell would."""
    out = _run(script, ["--dry-run", *args], env)  # first: after `--` it would be passed through
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines()]


def _remote_command(words: list[str]) -> str:
    return next(w.split("=", 1)[1] for w in words if w.startswith("--command="))


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install -y shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS + ["common.sh"])
def test_shellcheck_clean(script):
    out = subprocess.run(["shellcheck", "-x", script], cwd=TPU, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script, args, expected", [
    ("create.sh", ARGS["create.sh"],
     ["gcloud compute tpus tpu-vm create sqlm --zone=us-west4-a --accelerator-type=v5litepod-8 "
      "--version=v2-alpha-tpuv5-lite --spot"]),
    ("create.sh", BASE + ["--accelerator-type=v4-8", "--project=my-proj"],
     ["gcloud compute tpus tpu-vm create sqlm --zone=us-west4-a --project=my-proj "
      "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base"]),
    ("create.sh", BASE + ["--accelerator-type", "v5p-32", "--version", "v2-alpha-tpuv5", "--spot",
                          "--queued"],
     ["gcloud compute tpus queued-resources create sqlm --zone=us-west4-a --node-id=sqlm "
      "--accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5 --spot"]),
    ("delete.sh", BASE, ["gcloud compute tpus tpu-vm delete sqlm --zone=us-west4-a"]),
    ("delete.sh", BASE + ["--queued", "--yes"],
     ["gcloud compute tpus queued-resources delete sqlm --zone=us-west4-a --force --quiet"]),
    ("logs.sh", BASE + ["--worker=3"],
     ["gcloud compute tpus tpu-vm ssh sqlm --zone=us-west4-a --worker=3 "
      "--command='tail -n 100 -F $HOME/sqlm_run.log'"]),
])
def test_dry_run_prints_the_exact_gcloud_commands(gcloud, script, args, expected):
    env, calls = gcloud
    out = _run(script, [*args, "--dry-run"], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == expected
    assert calls() == [], "--dry-run must not call gcloud"


def test_setup_copies_the_working_tree_and_installs_jax_tpu(gcloud):
    env, _ = gcloud
    pack, scp, ssh = _dry_run("setup.sh", ARGS["setup.sh"], env)
    assert pack[:2] == ["bash", "-c"] and "git -C" in pack[2] and "tar -czf" in pack[2]
    assert scp[:5] == "gcloud compute tpus tpu-vm scp".split() and "sqlm:sqlm_jax.tgz" in scp
    assert "--worker=all" in scp and "--worker=all" in ssh
    remote = _remote_command(ssh)
    for text in ("tar -xzf", "uv venv --seed --python 3.11", "pip install -q -e $HOME/sqlm_jax",
                 f"pip install -q 'jax[tpu]=={jax.__version__}' gcsfs"):
        assert text in remote
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0
    assert not list(Path(env["TMPDIR"]).glob("*.tgz")), "--dry-run must not write the archive"


def test_tpu_installs_the_jax_that_was_tested():
    """tpu/setup.sh and the notebook pin the TPU jax to the one these tests run on, which setup.py's
    range admits (a TPU VM would otherwise take the newest jax beside the tested flax)."""
    tested = jax.__version__
    pinned = re.search(r'^JAX_VERSION="(.+)"$', (TPU / "setup.sh").read_text(), re.M).group(1)
    notebook = json.loads((TPU.parent / "notebooks" / "colab_tpu_demo.ipynb").read_text())
    settings = "".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    assert pinned == tested and f'JAX_VERSION = "{tested}"' in settings
    setup_py = (TPU.parent / "setup.py").read_text()
    jax_req = Requirement(re.search(r'"(jax[<>=].*?)"', setup_py).group(1))
    assert jax_req.specifier.contains(tested) and not jax_req.specifier.contains("0.11.1")
    for name in ("flax", "orbax-checkpoint"):  # the next minor lines are known to break
        spec = Requirement(re.search(rf'"({name}[<>=].*?)"', setup_py).group(1)).specifier
        assert any(s.operator == "<" for s in spec), f"{name} needs an upper bound in setup.py"


def test_setup_clones_a_repo_when_given_one(gcloud):
    env, _ = gcloud
    (ssh,) = _dry_run("setup.sh", BASE + ["--repo=https://example.com/sqlm_jax.git", "--ref=v1"], env)
    remote = _remote_command(ssh)
    assert "git clone -q https://example.com/sqlm_jax.git $HOME/sqlm_jax" in remote
    assert "checkout -q v1" in remote and f"pip install -q 'jax[tpu]=={jax.__version__}'" in remote
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0


def test_launch_always_resumes_and_passes_overrides(gcloud):
    env, _ = gcloud
    (ssh,) = _dry_run("launch.sh", ARGS["launch.sh"] + ["--config.rl.kl_coef=0.01"], env)
    assert ssh[:7] == "gcloud compute tpus tpu-vm ssh sqlm".split() + ["--zone=us-west4-a"]
    assert "--worker=all" in ssh
    remote = _remote_command(ssh)
    assert ("$HOME/sqlm_venv/bin/python -m sqlm_jax.main --config=configs/algebra.py "
            "--config.workdir=gs://bucket/algebra --config.resume=True --config.rl.kl_coef=0.01") in remote
    assert "nohup" in remote and ">> $HOME/sqlm_run.log" in remote


@pytest.mark.parametrize("script", SCRIPTS)
def test_real_run_executes_what_dry_run_prints(gcloud, script):
    env, calls = gcloud
    printed = _dry_run(script, ARGS[script], env)
    out = _run(script, ARGS[script], env)
    assert out.returncode == 0, out.stderr
    assert [c["argv"] for c in calls()] == [words for words in printed if words[0] == "gcloud"]
    if script == "setup.sh":  # the archive held the project, and was cleaned up afterwards
        archive = next(c["archive"] for c in calls() if "archive" in c)
        assert "setup.py" in archive and "sqlm_jax/plan/__init__.py" in archive and "tpu/setup.sh" in archive
        assert not list(Path(env["TMPDIR"]).glob("*.tgz"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_required_arguments_are_a_usage_error(gcloud, script):
    env, calls = gcloud
    out = _run(script, ["--dry-run"], env)
    assert out.returncode == 2
    assert "error: missing --name" in out.stderr and "usage: tpu/" + script in out.stderr
    assert calls() == []


def test_unknown_arguments_and_missing_values_are_usage_errors(gcloud):
    env, _ = gcloud
    out = _run("create.sh", BASE + ["--accelerator-type=v4-8", "--zoen=x"], env)
    assert out.returncode == 2 and "error: unknown argument: --zoen=x" in out.stderr
    out = _run("create.sh", BASE + ["--accelerator-type"], env)
    assert out.returncode == 2 and "error: --accelerator-type needs a value" in out.stderr
    out = _run("launch.sh", BASE + ["--config=configs/algebra.py"], env)
    assert out.returncode == 2 and "error: missing --workdir" in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = _run(script, ["--help"], os.environ)
    assert out.returncode == 0 and out.stdout.startswith("usage: tpu/" + script)


def test_name_and_zone_come_from_the_environment(gcloud):
    env, _ = gcloud
    env = {**env, "TPU_NAME": "from-env", "TPU_ZONE": "europe-west4-b"}
    (ssh,) = _dry_run("stop.sh", [], env)
    assert ssh[5:8] == ["from-env", "--zone=europe-west4-b", "--worker=all"]


FAKE_TRAINER = """#!/usr/bin/env bash
# Stands in for the venv's python on a worker: records its arguments, runs until SIGTERM.
# (written aside, then renamed: the test reads it as soon as it exists)
printf '%s\\n' "$@" > "$HOME/argv.part" && mv "$HOME/argv.part" "$HOME/argv"
trap 'echo SIGTERM >> "$HOME/argv"; exit 0' TERM
while true; do sleep 0.1; done
"""


def test_launch_and_stop_commands_work_on_a_worker(gcloud, tmp_path):
    """Runs the --command strings of launch.sh and stop.sh with bash, as a worker would."""
    env, _ = gcloud
    home = tmp_path / "worker"
    (home / "sqlm_jax").mkdir(parents=True)
    (home / "sqlm_venv" / "bin").mkdir(parents=True)
    (home / "sqlm_venv" / "bin" / "python").write_text(FAKE_TRAINER)
    (home / "sqlm_venv" / "bin" / "python").chmod(0o755)
    tricky = "--config.task_options.proposer_prompt=Don't solve it; \"quotes\" $HOME"
    launch = _remote_command(_dry_run("launch.sh", ARGS["launch.sh"] + ["--", tricky], env)[0])
    stop = _remote_command(_dry_run("stop.sh", ARGS["stop.sh"], env)[0])
    worker = {"PATH": env["PATH"], "HOME": str(home)}
    pid = None
    try:
        assert subprocess.run(["bash", "-c", launch], env=worker, timeout=10).returncode == 0
        pid = int((home / "sqlm_run.pid").read_text())
        _wait_for(lambda: (home / "argv").exists())
        assert (home / "argv").read_text().splitlines() == [
            "-m", "sqlm_jax.main", "--config=configs/algebra.py", "--config.workdir=gs://bucket/algebra",
            "--config.resume=True", tricky]
        again = subprocess.run(["bash", "-c", launch], env=worker, capture_output=True, text=True, timeout=10)
        assert again.returncode == 1 and "a run is still going" in again.stderr
        stopped = subprocess.run(["bash", "-c", stop], env=worker, capture_output=True, text=True, timeout=10)
        assert "SIGTERM sent" in stopped.stdout
        _wait_for(lambda: "SIGTERM" in (home / "argv").read_text())
        log = (home / "sqlm_run.log").read_text()
        assert "launch" in log and "sqlm_jax.main" in log
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
