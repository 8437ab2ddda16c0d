"""Imports every module of the installed sqlm_jax, each in a fresh interpreter, and fails on the first
package that is missing: a runtime dependency left out of install_requires shows here, in a virtualenv
that has only `pip install .`, before any user meets it.

One interpreter per module, because the command-line modules each define absl's `--config` flag and
cannot be imported side by side.
"""
import concurrent.futures
import os
import pkgutil
import subprocess
import sys

import sqlm_jax


def main() -> int:
    modules = ["sqlm_jax"] + [m.name for m in pkgutil.walk_packages(sqlm_jax.__path__, "sqlm_jax.")
               if not m.name.endswith(".__main__")]  # runs a command line, has nothing to import
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def check(module):
        out = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True,
                             text=True)
        return module, out.returncode, (out.stderr.strip().splitlines() or [""])[-1]

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        failed = [(m, last) for m, rc, last in pool.map(check, modules) if rc]
    for module, last in failed:
        print(f"error: import {module} failed in a virtualenv with only `pip install .`: {last}")
    print(f"imported {len(modules) - len(failed)} of {len(modules)} sqlm_jax modules")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
