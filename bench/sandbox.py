"""Benchmark sqlm_jax.sandbox: test executions per second for trivial programs, and what isolation costs.

    python bench/sandbox.py [--programs 200] [--tests 5] [--workers N] [--repeats 15]

Prints a markdown table of wall-clock times (medians, the variants interleaved so that load from
other processes hits them alike) and, where a cgroup can be made (root), CPU times: on a shared
machine the wall clock also measures the neighbours, CPU time does not, and cores / (CPU per test
execution) is the rate the same machine sustains when idle.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

from sqlm_jax import sandbox

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


class CpuMeter:
    """CPU seconds used by this process and every descendant, sandboxes included, via a cgroup.

    rusage cannot see inside bwrap's pid namespace (bwrap's init reaps those processes); a cgroup
    counts them. Needs root and a cgroup v1 cpuacct or a v2 hierarchy; `available` says if it worked.
    """

    # (hierarchy, usage file, seconds per unit): v1 cpuacct.usage is in ns, v2 cpu.stat's usage_usec in us.
    LAYOUTS = (("/sys/fs/cgroup/cpuacct", "cpuacct.usage", 1e-9), ("/sys/fs/cgroup", "cpu.stat", 1e-6))

    def __init__(self):
        self.available = False
        for base, usage_file, scale in self.LAYOUTS:
            group = os.path.join(base, f"sqlm-bench-{os.getpid()}")
            try:
                os.mkdir(group)
                self._join(group)
            except OSError:
                continue
            self.base, self.group, self.usage_file, self.scale = base, group, usage_file, scale
            self.available = True
            return

    def seconds(self):
        with open(os.path.join(self.group, self.usage_file)) as usage:
            fields = usage.read().split()
        value = fields[fields.index("usage_usec") + 1] if "usage_usec" in fields else fields[0]
        return self.scale * int(value)

    def close(self):
        if self.available:
            self._join(self.base)
            os.rmdir(self.group)

    @staticmethod
    def _join(group):
        with open(os.path.join(group, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))


    def timed(self, run):
        """Run `run()`; return (wall seconds, CPU seconds or None)."""
        cpu_start, start = self.available and self.seconds(), time.perf_counter()
        run()
        return time.perf_counter() - start, (self.seconds() - cpu_start if self.available else None)


def measure(variants, repeats, meter):
    """Per variant: (median wall ms, mean CPU ms or None), the variants' runs interleaved."""
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            samples[name].append(meter.timed(run))
    return {name: (1000 * statistics.median(wall for wall, _ in runs),
                   None if runs[0][1] is None else 1000 * statistics.mean(cpu for _, cpu in runs))
            for name, runs in samples.items()}


def difference(a, b, per=1):
    """(a - b) / per for (wall, CPU) pairs; CPU stays None where unmeasured."""
    return (a[0] - b[0]) / per, None if a[1] is None else (a[1] - b[1]) / per


def fmt(ms):
    return "n/a" if ms is None else f"{ms:.1f} ms"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=200)
    parser.add_argument("--tests", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    tests = [(f"{i} {i}", str(2 * i)) for i in range(args.tests)]
    sandbox.run_program(ADD, tests[:1])  # the one-off bubblewrap check, outside the timings
    bwrap = list(sandbox._bwrap_argv(sandbox.SandboxConfig())[: -len(sandbox._runner_argv())])  # up to "--"
    python_pass = [sys.executable, "-I", "-S", "-c", "pass"]
    meter = CpuMeter()
    try:
        rows = measure({
            "python -c pass (site included, like `python main.py`)":
                lambda: subprocess.run([sys.executable, "-c", "pass"]),
            "bare interpreter: python -I -S -c pass": lambda: subprocess.run(python_pass),
            "bwrap + python -I -S -c pass":
                lambda: subprocess.run(bwrap + python_pass, env=sandbox._SANDBOX_ENV),
            "run_program, 1 test": lambda: sandbox.run_program(ADD, tests[:1]),
            f"run_program, {args.tests} tests": lambda: sandbox.run_program(ADD, tests),
        }, args.repeats, meter)
        load = os.getloadavg()[0]
        jobs = [(ADD, tests)] * args.programs
        results = []
        elapsed, cpu = meter.timed(lambda: results.extend(sandbox.run_many(jobs, workers=args.workers)))
    finally:
        meter.close()
    executions = sum(len(result.statuses) for result in results)
    assert sandbox.status_counts(results)["passed"] == executions, sandbox.status_counts(results)

    _, bare, bwrapped, single, several = rows.values()
    rows["isolation: bwrap's share of a start"] = difference(bwrapped, bare)
    rows["per-run overhead: run_program(1 test) - bare interpreter"] = difference(single, bare)
    rows["each further test of the same program"] = difference(several, single, per=args.tests - 1)
    print(f"{os.cpu_count()} cores; load average {load:.2f} at the start of the run_many measurement\n")
    print("| measure | wall clock (median) | CPU, all processes (mean) |")
    print("|---|---|---|")
    for name, (wall_ms, cpu_ms) in rows.items():
        print(f"| {name} | {fmt(wall_ms)} | {fmt(cpu_ms)} |")
    print(f"| run_many: {args.programs} programs x {args.tests} tests, {args.workers} workers "
          f"| {elapsed:.2f} s = **{executions / elapsed:.0f} test executions/s** "
          f"| {fmt(cpu and 1000 * cpu / executions)} per execution |")
    if cpu is not None:
        print(f"| cores' worth of CPU the run_many got (CPU / wall clock) | "
              f"| {cpu / elapsed:.2f} of {os.cpu_count()} |")
        print(f"| run_many capacity of {os.cpu_count()} idle cores (cores / CPU per execution) | | "
              f"**{os.cpu_count() * executions / cpu:.0f} test executions/s** |")


if __name__ == "__main__":
    main()
