"""Runs the tiny self-play config in its own process (multi-host and preemption tests).

    python tests/run_driver.py MODEL WORKDIR OUT.npz --steps 2 [--devices 2 --processes 2 --process-id 0
                               --port 12345] [--resume] [--rewarded]

--rewarded: the scripted policy of tests/tiny_models.py (known answers, half of them rewarded) with
no weight decay, so the weights move by large gradients alone.

Writes the final parameters (gathered on every host) to OUT.npz, one file per process.
"""
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("workdir")
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--rewarded", action="store_true")
args = parser.parse_args()

# Before jax is imported: this process's fake CPU devices.
os.environ["XLA_FLAGS"] = " ".join([f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
                                   + [f"--xla_force_host_platform_device_count={args.devices}"])
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sqlm_jax import distributed, mesh as mesh_lib  # noqa: E402
from tests.tiny_models import (arithmetic_script, rewarded_run_config, scripted_sample,  # noqa: E402
                               tiny_run_config)

config = (rewarded_run_config if args.rewarded else tiny_run_config)(args.model, args.workdir, steps=args.steps)
config.resume = args.resume
if args.processes > 1:
    config.distributed.coordinator_address = f"127.0.0.1:{args.port}"
    config.distributed.num_processes = args.processes
    config.distributed.process_id = args.process_id
distributed.initialize(config.distributed)

from sqlm_jax.train import Trainer  # noqa: E402

if args.rewarded:
    from sqlm_jax import rollout  # noqa: E402
    from sqlm_jax.tokenizer import load_tokenizer  # noqa: E402
    rollout.sample = scripted_sample(load_tokenizer(args.model), arithmetic_script)

trainer = Trainer(config)
summary = trainer.run()
params = {".".join(map(str, k)): np.asarray(mesh_lib.gather(v.get_value()))
          for k, v in nnx.to_flat_state(trainer.learner.state.params)}
np.savez(args.out, **params)
print("SUMMARY", summary.get("steps", summary.get("stopped_at")), flush=True)
