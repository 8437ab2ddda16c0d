"""sqlm_jax.sandbox: honest programs score exactly as under the reference's rule, within the configured limits."""
import textwrap

import pytest

from sqlm_jax import sandbox
from sqlm_jax.sandbox import SandboxConfig, SandboxResult, run_many, run_program, status_counts
from tests.sandbox_marks import ADD, needs_bwrap, needs_root


def score(code, tests, **kwargs):
    return run_program(textwrap.dedent(code), tests, **kwargs)


# --------------------------------------------------------------------------------------------------
# Honest programs: the reference's comparison rule, exactly.


@needs_bwrap
@pytest.mark.parametrize(
    "code, tests, expected_statuses",
    [
        (ADD, [("1 2", "3"), ("10 -4\n", "6\n"), ("0 0", "0")], ["passed"] * 3),
        # Trailing newlines are stripped on both sides, and nothing else is.
        ("print('1 2')\nprint()\n", [("", "1 2")], ["passed"]),
        ("print('1 2', end='')", [("", "1 2\n\n\n")], ["passed"]),
        ("print('1 2 ')", [("", "1 2")], ["wrong_answer"]),
        ("print(' 1 2')", [("", "1 2")], ["wrong_answer"]),
        ("print('1  2')", [("", "1 2")], ["wrong_answer"]),
        ("print('1 2')", [("", "1 2 ")], ["wrong_answer"]),
        ("print('')", [("", "")], ["passed"]),
        # Subtly wrong: max that starts from 0 fails exactly the all-negative tests.
        (
            "xs = map(int, input().split())\nm = 0\nfor x in xs:\n    m = max(m, x)\nprint(m)\n",
            [("1 5 3", "5"), ("-1 -5", "-1"), ("0", "0"), ("-7", "-7"), ("2 2", "2")],
            ["passed", "wrong_answer", "passed", "wrong_answer", "passed"],
        ),
        # A correct output followed by an error exit is not a pass; sys.exit(0) is.
        ("print(3)\nraise ValueError", [("", "3")], ["crash"]),
        ("import sys\nprint(3)\nsys.exit(0)", [("", "3")], ["passed"]),
        ("import sys\nprint(3)\nsys.exit(2)", [("", "3")], ["crash"]),
        ("input()", [("", "")], ["crash"]),  # EOFError on empty stdin
        ("print(1", [("", "1"), ("", "1")], ["compile_error"] * 2),
    ],
)
def test_honest_programs_score_exactly(code, tests, expected_statuses):
    result = run_program(code, tests)
    assert list(result.statuses) == expected_statuses
    assert result.passed == tuple(status == "passed" for status in expected_statuses)
    assert result.fraction == expected_statuses.count("passed") / len(expected_statuses)


@needs_bwrap
def test_only_the_first_ten_tests_count():
    tests = [(f"{i} 1", str(i + 1)) for i in range(10)] + [("1 1", "3"), ("2 2", "5")]
    result = run_program(ADD, tests)
    assert len(result.statuses) == 10 and result.fraction == 1.0
    wrong_first = run_program(ADD, [("1 1", "3")] + tests[1:])
    assert wrong_first.fraction == 0.9
    assert run_program(ADD, tests, config=SandboxConfig(max_tests=12)).fraction == 10 / 12


@needs_bwrap
def test_compile_error_and_no_tests():
    result = run_program("def f(:\n    pass", [("", "")] * 3)
    assert result.statuses == ("compile_error",) * 3 and result.fraction == 0.0
    assert "SyntaxError" in result.detail
    assert run_program(ADD, []) == SandboxResult((), (), 0.0)
    with pytest.raises(ValueError, match="timeout_s"):
        run_program(ADD, [("1 2", "3")], timeout_s=0)


@needs_bwrap
@pytest.mark.parametrize(
    "code, stdin, expected",
    [
        # The stack-size idiom of competitive programmers: the answer comes from a non-daemon thread.
        ("""
         import sys, threading
         sys.setrecursionlimit(10**6)
         threading.stack_size(1 << 26)
         def depth(n):
             return 0 if n == 0 else 1 + depth(n - 1)
         threading.Thread(target=lambda: print(depth(int(input())))).start()
         """, "20000", "20000"),
        # The fast-I/O template: print into a buffer, written out by an atexit handler.
        ("""
         import atexit, io, sys
         sys.stdout = io.StringIO()
         atexit.register(lambda: sys.__stdout__.write(sys.stdout.getvalue()))
         print(sum(map(int, sys.stdin.read().split())))
         """, "1 2 3\n4", "10"),
        ("import numpy as np\nprint(int(np.array(input().split(), dtype=int).sum()))", "1 2 3", "6"),
        ("print(input()[::-1])", "héllo ✓", "✓ olléh"),
        ("print(__name__, __file__)\nimport sys\nprint(sys.argv)", "", "__main__ main.py\n['main.py']"),
        # Large input and output: 200k numbers each way.
        ("import sys\nprint(' '.join(str(2 * int(x)) for x in sys.stdin.read().split()))",
         " ".join(map(str, range(200_000))), " ".join(str(2 * i) for i in range(200_000))),
    ],
)
def test_programs_behave_as_under_plain_python(code, stdin, expected):
    result = score(code, [(stdin, expected)])
    assert result.statuses == ("passed",)


@needs_bwrap
def test_run_many_keeps_order_and_counts_statuses():
    jobs = [(ADD, [(f"{i} {i}", str(2 * i)), ("1 1", "3")]) for i in range(6)] + [("print(1", [("", "1")])]
    results = run_many(jobs, workers=2)
    assert [r.statuses for r in results[:6]] == [("passed", "wrong_answer")] * 6
    assert results[6].statuses == ("compile_error",)
    counts = status_counts(results)
    assert counts["passed"] == 6 and counts["wrong_answer"] == 6 and counts["compile_error"] == 1
    assert set(counts) == set(sandbox.STATUSES) and sum(counts.values()) == 13


@needs_bwrap
@needs_root
def test_limits_are_the_configured_ones():
    threads = """
        import threading, time
        started = 0
        try:
            for _ in range(10):
                threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()
                started += 1
        except RuntimeError:
            pass
        print(started)
        """
    assert score(threads, [("", "3")]).statuses == ("passed",)  # nproc 4: itself and 3 threads
    assert score(threads, [("", "7")], config=SandboxConfig(nproc=8)).statuses == ("passed",)
    allocate = "x = bytearray(300 << 20)\nprint(len(x) >> 20)"
    assert score(allocate, [("", "300")]).statuses == ("passed",)
    small = SandboxConfig(memory_bytes=256 << 20)
    assert score(allocate, [("", "300")], config=small).statuses == ("memory",)
