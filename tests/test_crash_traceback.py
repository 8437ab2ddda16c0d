"""A bug is not a user error: it shows its traceback, but the one that matters (issue 29). The frames
of this package and the error stay; the pages of jax, flax and absl frames before it are counted, not
shown; `SQLM_JAX_DEBUG=1` shows Python's full traceback, as before."""
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sqlm_jax.errors import DEBUG_VARIABLE, short_traceback
from tests.tiny_models import subprocess_xla_flags

ROOT = Path(__file__).resolve().parents[1]

# The crash of issue 29, put back: the layers rematerialised by nnx.remat (as before 92e160e), which in
# the sampler's compiled decode loop writes Variables of the outer trace and fails deep inside flax.
INJECT = """
import runpy
from flax import nnx
import sqlm_jax.models.transformer as transformer
transformer._run_layer_remat = lambda layer, rows, mesh, *args: nnx.remat(
    lambda layer, *args: transformer._run_layer(layer, rows, mesh, *args))(layer, *args)
runpy.run_module("sqlm_jax.main", run_name="__main__")
"""
TINY = ["--config=configs/tiny.py", "--config.model.remat=True", "--config.train.steps=1",
        "--config.eval.num_problems=8", "--config.eval.second_set_problems=8", "--config.eval.sampled_n=0"]
LIBRARY_FRAME = re.compile(r'File "[^"]*(site-packages|dist-packages|/flax/|/jax/|/absl/|<frozen )')


def _crash(tmp_path, debug: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags()}
    env.pop(DEBUG_VARIABLE, None)
    if debug:
        env[DEBUG_VARIABLE] = "1"
    out = subprocess.run([sys.executable, "-c", INJECT, *TINY, f"--config.workdir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, f"the injected bug must end the run with code 1:\n{out.stderr[-3000:]}"
    return out


def test_a_crash_in_compiled_code_shows_the_package_frames_and_the_error_only(tmp_path):
    out = _crash(tmp_path, debug=False)
    lines = out.stderr.strip().splitlines()
    assert len(lines) < 40, out.stderr
    assert lines[0] == "Traceback (most recent call last):", out.stderr
    # The injected bug's own frame (`File "<string>"`, from `python -c`) is neither package nor library.
    frames = [line for line in lines if line.lstrip().startswith('File "') and '"<string>"' not in line]
    assert not [f for f in frames if LIBRARY_FRAME.search(f)], out.stderr
    assert all(f'{ROOT / "sqlm_jax"}' in f for f in frames), out.stderr
    # From the command down to the layer that called into flax, in order.
    names = [re.search(r", in (\S+)$", f).group(1) for f in frames]
    assert names[0] == "main" and names[-1] == "hidden_states" and "evaluate" in names, out.stderr
    # Where flax and jax took over: one line, counted; then the error itself, then how to see it all.
    hidden = re.fullmatch(r"  \.\.\. (\d+) frames in (.+)", lines[-3])
    assert hidden and int(hidden.group(1)) > 5 and "flax" in hidden.group(2), out.stderr
    assert lines[-2].startswith("flax.errors.TraceContextError: Cannot mutate"), out.stderr
    assert f"{DEBUG_VARIABLE}=1" in lines[-1] and "JAX_TRACEBACK_FILTERING" not in out.stderr


def test_debug_shows_the_full_traceback(tmp_path):
    out = _crash(tmp_path, debug=True)
    frames = [line for line in out.stderr.splitlines() if line.lstrip().startswith('File "')]
    assert sum("/flax/" in f for f in frames) > 5, out.stderr[-3000:]
    assert any("absl/app.py" in f for f in frames) and "TraceContextError: Cannot mutate" in out.stderr
    assert "frames in" not in out.stderr


# short_traceback in process, on a stand-in library: a module whose file lies among the installed packages.
FAKE_LIBRARY = """
def call(f):
    return f()

def convert(x):
    try:
        return int(x)
    except ValueError:
        raise TypeError("not a number: " + repr(x))
"""


def _fake_library():
    namespace = {"__name__": "fakelib.core"}
    path = os.path.join(sysconfig.get_paths()["purelib"], "fakelib", "core.py")
    exec(compile(FAKE_LIBRARY, path, "exec"), namespace)
    return namespace


def test_short_traceback_folds_library_frames_and_keeps_chains_through_own_code():
    lib = _fake_library()

    def own_code():
        return lib["convert"]("x")

    try:
        try:
            lib["call"](own_code)
        except TypeError as e:
            raise RuntimeError("could not read the answer") from e
    except RuntimeError as e:
        e.add_note("--------------------\nFor simplicity, JAX has removed its internal frames from the "
                   "traceback of the following exception. Set JAX_TRACEBACK_FILTERING=off to include these.")
        e.add_note("a note of our own")
        text = short_traceback(e)
    lines = text.splitlines()
    # The TypeError passed through our code (own_code), so it stays; the ValueError the library raised
    # and handled inside itself does not.
    assert "ValueError" not in text and "invalid literal" not in text
    assert [l for l in lines if l and not l.startswith(" ")] == [
        "Traceback (most recent call last):", "TypeError: not a number: 'x'",
        "The above exception was the direct cause of the following exception:",
        "Traceback (most recent call last):", "RuntimeError: could not read the answer", "a note of our own",
        f"(hidden: 3 frames inside libraries, 1 exception raised inside them before this one; "
        f"{DEBUG_VARIABLE}=1 shows the full traceback)"], text
    me = "in test_short_traceback_folds_library_frames_and_keeps_chains_through_own_code"
    frames = [re.sub(r'^File ".*", line \d+, ', "", l.strip()) for l in lines if l.startswith(("  File", "  ..."))]
    assert frames == [me, "... 1 frame in fakelib", "in own_code", "... 1 frame in fakelib", me], text
    assert "fakelib/core.py" not in text and "For simplicity" not in text


def test_out_of_memory_on_the_accelerator_is_one_line_naming_the_knobs():
    from sqlm_jax.errors import one_line_errors
    refusal = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(33.19G) exceeds available HBM (30.75G).\nmore detail")
    with pytest.raises(SystemExit) as exit_:
        with one_line_errors():
            raise RuntimeError(refusal)
    message = str(exit_.value.code)
    assert message.startswith("error: the accelerator ran out of memory (RESOURCE_EXHAUSTED: Ran out of memory")
    assert "micro_batch_size=-1" in message and "--compile" in message and "\n" not in message
    with pytest.raises(SystemExit) as exit_:  # any other RESOURCE_EXHAUSTED stays a bug's report
        with one_line_errors():
            raise RuntimeError("RESOURCE_EXHAUSTED: too many open files")
    assert exit_.value.code == 1
