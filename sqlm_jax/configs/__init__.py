"""The experiment configs, shipped inside the package so an installed `sqlm_jax` has them too.

In a checkout, `configs/` is a link to this folder. Each file defines `get_config()` returning an
`ml_collections.ConfigDict` built on `sqlm_jax.defaults.base_config()`.

`--config=configs/NAME.py` names a file relative to the working directory; when no such file exists
(an installed package run from any other directory, a Colab notebook), the shipped `NAME.py` is
used instead, so the README's commands work wherever they are typed.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent


def names() -> list[str]:
    """The shipped experiments, e.g. ['algebra', 'arithmetic', ...]."""
    return sorted(p.stem for p in SHIPPED.glob("*.py") if not p.name.startswith("_"))



def get(name: str):
    """The shipped config `name` (e.g. "tiny"), as its get_config() builds it."""
    if name not in names():
        raise FileNotFoundError(f"no shipped config {name!r}; choose one of {names()}")
    return runpy.run_path(str(SHIPPED / f"{name}.py"))["get_config"]()


def resolve(path: str) -> str:
    """`path` itself when it is a file; else the shipped config of the same file name.

    A `path:argument` suffix (ml_collections' config-file arguments) is kept as it is. Raises
    FileNotFoundError, naming the shipped configs, when neither exists.
    """
    file, sep, argument = path.partition(":")
    if os.path.isfile(file):
        return path
    shipped = SHIPPED / Path(file).name
    if Path(file).parent in (Path("configs"), Path(".")) and shipped.is_file():
        return str(shipped) + sep + argument
    raise FileNotFoundError(f"config file {file!r} not found; pass a path to a config file, or one of "
                            f"the shipped configs/NAME.py with NAME in {names()}")


def resolve_flag(argv: list[str], flag: str = "config") -> list[str]:
    """`argv` with the value of `--{flag}=PATH` (or `--{flag} PATH`) passed through `resolve`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith(f"--{flag}="):
            out[i] = f"--{flag}=" + resolve(arg.split("=", 1)[1])
        elif arg == f"--{flag}" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out


_CONFIG_FLAG = None


def config_flag():
    """The `--config=configs/NAME.py` flag of the command lines that run an experiment's config
    (`sqlm_jax.main`, `sqlm_jax.evaluate`), with its `--config.KEY=VALUE` overrides: defined on the
    first call, its holder returned on every call. Here, not in one of those commands, so that neither
    imports the other."""
    global _CONFIG_FLAG
    if _CONFIG_FLAG is None:
        from ml_collections import config_flags
        _CONFIG_FLAG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                                       lock_config=True)
    return _CONFIG_FLAG


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def _asks_for_help(argv: list[str]) -> bool:
    for arg in argv[1:]:
        if arg == "--":
            return False
        name, _, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name in _HELP_FLAGS and value.lower() not in ("false", "f", "0"):
            return True
    return False


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for the command lines (`app.run(main, flags_parser=parse_flags)`): the
    `--config` file resolved as above, an unknown config key or a bad flag reported in one line
    instead of a traceback, and `--help` (or --helpfull) exiting with code 0 after the usage, not
    absl's 1."""
    from absl import flags
    try:
        return flags.FLAGS(resolve_flag(argv))
    except (AttributeError, KeyError) as e:  # ml_collections: --config.<unknown key>=...
        hint = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
        sys.exit(f"error: unknown config key: {hint}")
    except (flags.Error, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except SystemExit as e:
        if e.code == 1 and _asks_for_help(argv):  # absl's help flags exit 1 once they print the usage
            sys.exit(0)
        raise
