"""`python -m sqlm_jax.main --config=configs/algebra.py [--config.rl.kl_coef=0.01 ...]`"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from sqlm_jax.configs import config_flag, parse_flags

_CONFIG = config_flag()
flags.declare_key_flag("config")  # listed by --help


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # JAX's backend probing logs at INFO; keep the console for the run
    from sqlm_jax.config_check import validate
    from sqlm_jax.errors import one_line_errors

    config = _CONFIG.value
    if config is None:
        sys.exit("error: pass --config=configs/<experiment>.py (e.g. configs/tiny.py)")
    with one_line_errors():
        validate(config)
        from sqlm_jax import distributed
        distributed.initialize(config.distributed)  # before anything touches a device
        from sqlm_jax.train import Trainer
        summary = Trainer(config).run()
    if "final_accuracy" in summary:
        first, last = summary["eval_history"][0], summary["eval_history"][-1]
        print(f"held-out greedy accuracy: {summary['base_accuracy']:.3f} -> {summary['final_accuracy']:.3f}")
        if "eval/sampled_accuracy" in last:
            print(f"held-out sampled accuracy (temperature 1): {first['eval/sampled_accuracy']:.3f} -> "
                  f"{last['eval/sampled_accuracy']:.3f}")
        print(f"plots: {config.workdir}/plots   exported model: {summary['export_dir']}   "
              f"summary: {config.workdir}/summary.json")
    else:
        print(f"stopped at step {summary['stopped_at']}; resume with --config.resume=True")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
