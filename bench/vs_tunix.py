"""One GRPO iteration in this project and in google/tunix's GRPOLearner, side by side, on the same tiny model.

The iteration is bench/vs_trl.py's: --prompts prompts of --prompt-len tokens × --n samples × --new-tokens
new tokens at temperature 1 with no early stop, log-probs under a frozen reference (k3 KL, coefficient
--kl-coef; the project's default 0.001), GRPO advantages from a dummy reward (seeded random numbers), one
AdamW update (the project's optim defaults: clip 1.0, weight decay 0.01, constant --lr) over all the
completions, a token-mean loss over the whole batch, PPO clip 0.2 with dual clip 3.

  ours:  vs_trl.OurGRPO, unchanged: sampling.sample(n) -> Learner.batch -> Learner.update, as Trainer
         runs them, micro-batches of --micro-batch sequences.
  tunix: google-tunix 0.1.7 GRPOLearner on an RLCluster with the "vanilla" rollout engine (tunix's own
         Sampler, KV cache of prompt + new tokens, top_p=1.0, a stop id the model cannot sample, all
         the completions in one rollout), the Qwen2 of tunix.models.qwen2 loaded by its
         create_model_from_safe_tensors, reference log-probs in one pass, --tunix-micro-batch
         sequences per gradient-accumulation step (train_micro_batch_size; by default tunix's own, all
         the completions at once) and one optax AdamW update (the same settings), loss_agg_mode
         token-mean, kl_loss_mode low_var_kl (k3) clamped to ±10 as ours.

Same weights: vs_trl.make_checkpoint saves one random transformers Qwen2ForCausalLM (4.07M parameters
at the default shape) in a temporary folder that both sides load; the script prints the largest logit
difference of each side against ours on one prompt.

tunix 0.1.7 needs safetensors<0.8 and our transformers pin needs >=0.8, so tunix cannot share this
environment: on first use the script creates a virtualenv for it (--tunix-venv, by default under
~/.cache/sqlm_jax/venvs; about 1.5 minutes and 1.6 GB from a nearby package index) with
google-tunix==0.1.7 and this environment's jax, flax and optax versions, and runs bench/tunix_grpo.py
there as a subprocess that reports its timings as JSON. The sides alternate, one iteration each (the
tunix process waits while ours runs and the other way round), so both see the same machine load;
XLA_FLAGS reaches both. The first --warmup iterations of each side (compilation) are dropped; the table
shows medians of the other --iters.

    pip install -e .[bench]
    python bench/vs_tunix.py
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python bench/vs_tunix.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_model_args, machine_line, markdown_table, median, model_config  # noqa: E402
from vs_trl import OurGRPO, check_same_weights, make_checkpoint  # noqa: E402

from sqlm_jax.defaults import base_config  # noqa: E402

TUNIX = "google-tunix==0.1.7"
WORKER = Path(__file__).with_name("tunix_grpo.py")

# (flag, default, help) of the iteration; OurGRPO reads these names from the parsed arguments.
ITERATION_FLAGS = [
    ("--prompts", 16, "prompts per iteration"),
    ("--n", 8, "samples per prompt (tunix's num_generations)"),
    ("--prompt-len", 32, "tokens per prompt"),
    ("--new-tokens", 64, "new tokens per sample (no early stop)"),
    ("--kl-coef", 0.001, "k3 KL coefficient (tunix's beta)"),
    ("--lr", 1e-5, "AdamW learning rate (constant)"),
    ("--micro-batch", 32, "our sequences per gradient-accumulation step"),
    ("--warmup", 2, "iterations of each side not timed"),
    ("--iters", 6, "timed iterations of each side"),
    ("--seed", 0, "weights, prompts, rewards"),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    for flag, default, help_text in ITERATION_FLAGS:
        p.add_argument(flag, type=type(default), default=default, help=help_text)
    p.add_argument("--tunix-micro-batch", type=int, default=None,
                   help="tunix's train_micro_batch_size in sequences (default: tunix's own, all the "
                        "completions in one pass; 32 took the same CPU time here)")
    p.add_argument("--recompute-old-logprobs", action="store_true",
                   help="ours: old log-probs by a forward pass (rl.reuse_sampler_logprobs=False)")
    p.add_argument("--no-shared-prompt-pass", action="store_true",
                   help="ours: one pass per row over prompt and response (rl.shared_prompt_pass=False)")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    p.add_argument("--tunix-venv", type=Path, default=cache / "sqlm_jax" / "venvs" / "tunix-0.1.7",
                   help="tunix's virtualenv, created on first use")
    p.add_argument("--tunix-log", type=Path, default=None,
                   help="where the tunix process's stderr goes (default: the run's temporary folder)")
    return p.parse_args()


def tunix_requirements() -> list[str]:
    """tunix, with this environment's jax, flax and optax so both sides run the same JAX."""
    from importlib.metadata import version
    return [TUNIX] + [f"{name}=={version(name)}" for name in ("jax", "jaxlib", "flax", "optax")]


def tunix_python(venv: Path) -> Path:
    """The virtualenv's python, after creating it or installing what it lacks (it records what was
    installed in requirements.txt)."""
    python, record = venv / "bin" / "python", venv / "requirements.txt"
    wanted = "\n".join(tunix_requirements()) + "\n"
    if python.exists() and record.exists() and record.read_text() == wanted:
        return python
    print(f"Installing {TUNIX} into its own virtualenv {venv} (once; about 1.5 minutes, 1.6 GB)",
          flush=True)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--progress-bar", "off", *wanted.split()],
                       check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"could not set up tunix's virtualenv {venv} ({e}); fix the cause above and "
                         f"rerun, or remove the folder to start it again") from e
    record.write_text(wanted)
    return python


class Tunix:
    """tunix_grpo.py in its virtualenv, one JSON line per event; see that file for the protocol."""

    def __init__(self, python: Path, run: dict, log: Path):
        self.log_path = log
        self.log = log.open("w")
        self.process = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        self.send(json.dumps(run))

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def expect(self, event: str) -> dict:
        line = self.process.stdout.readline()
        message = json.loads(line) if line else {}
        if message.get("event") != event:
            self.process.kill()
            self.log.close()
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-40:])
            raise SystemExit(f"tunix side: expected {event!r}, got {line.strip() or 'end of output'}; "
                             f"the last lines of its log ({self.log_path}):\n{tail}")
        return message

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


def main():
    args = parse_args()
    args.tunix_micro_batch = args.tunix_micro_batch or args.prompts * args.n
    completions = args.prompts * args.n
    if completions % args.micro_batch or completions % args.tunix_micro_batch or \
            args.tunix_micro_batch % args.n:
        raise SystemExit("--micro-batch and --tunix-micro-batch must divide --prompts x --n, and "
                         "--tunix-micro-batch be a multiple of --n (tunix micro-batches whole prompts)")
    python = tunix_python(args.tunix_venv)
    with tempfile.TemporaryDirectory(prefix="vs_tunix_") as tmp:
        compare(args, Path(tmp), python)


def compare(args, folder: Path, python: Path) -> None:
    tokenizer = make_checkpoint(args, folder)
    rng = np.random.default_rng(args.seed)
    steps = args.warmup + args.iters
    texts = [" ".join(f"w{i}" for i in rng.integers(3, args.vocab, args.prompt_len))
             for _ in range(args.prompts * steps)]
    batches = [texts[i * args.prompts:(i + 1) * args.prompts] for i in range(steps)]
    c = base_config()
    run = dict(folder=str(folder), prompts=batches, n=args.n, prompt_len=args.prompt_len,
               new_tokens=args.new_tokens, kl_coef=args.kl_coef, micro_batch=args.tunix_micro_batch,
               seed=args.seed, clip_eps=c.rl.clip_eps, dual_clip_c=c.rl.dual_clip_c,
               optim={**c.optim.to_dict(), "lr": args.lr})
    tunix = Tunix(python, run, args.tunix_log or folder / "tunix.log")  # loads while ours loads
    ours = OurGRPO(args, folder)
    first = tokenizer(texts[0])["input_ids"]
    ready = tunix.expect("ready")
    ours_logits = np.asarray(ours.model(np.asarray([first])))[0]
    print(f"same weights: max |logit difference| vs ours: transformers "
          f"{check_same_weights(folder, ours.model, first):.1e}, tunix "
          f"{np.abs(np.asarray(ready['logits']) - ours_logits).max():.1e}")
    print(f"tunix: {TUNIX} in {args.tunix_venv}, {ready['tunix_devices']} device(s); {machine_line()}")

    ours_times, tunix_times = [], []
    for i, batch in enumerate(batches):
        tunix_times.append(tunix.expect("iteration"))
        ours_times.append(ours.iteration([tokenizer(t)["input_ids"] for t in batch], seed=i))
        print(f"iteration {i}: tunix {tunix_times[-1]['total']:.2f} s, ours {ours_times[-1]['total']:.2f} s",
              flush=True)
        tunix.send("go")
    tunix.expect("done")
    tunix.close()
    if tunix_times[-1]["optimizer_steps"] != steps:
        raise SystemExit(f"tunix made {tunix_times[-1]['optimizer_steps']} optimizer steps, not {steps}")
    print_table(args, ours, ours_times, tunix_times)


def print_table(args, ours: OurGRPO, ours_times: list[dict], tunix_times: list[dict]) -> None:
    timed = slice(args.warmup, None)
    keys = ("total", "cpu", "generation", "logprobs", "update")
    o, t = ({k: median([it[k] for it in times[timed]]) for k in keys} for times in (ours_times, tunix_times))
    tokens = args.prompts * args.n * args.new_tokens
    rows = [["s per iteration", f"{o['total']:.2f}", f"{t['total']:.2f}", f"**{t['total'] / o['total']:.2f}x**"],
            ["completion tokens/s", f"{tokens / o['total']:,.0f}", f"{tokens / t['total']:,.0f}", ""],
            ["CPU s per iteration (process, all threads)", f"{o['cpu']:.2f}", f"{t['cpu']:.2f}",
             f"{t['cpu'] / o['cpu']:.2f}x"]]
    rows += [[f"  {label}", f"{o[k]:.2f}", f"{t[k]:.2f}", f"{t[k] / o[k]:.2f}x"]
             for k, label in (("generation", "generation"),
                              ("logprobs", "reference log-probs, rewards, advantages"),
                              ("update", "update (forward + backward, AdamW)"))]
    rows.append(["first iteration (compilation)", f"{ours_times[0]['total']:.2f}",
                 f"{tunix_times[0]['total']:.2f}", ""])
    setting = [f"{args.prompts} prompts x {args.n} samples x {args.new_tokens} new tokens",
               f"prompts of {args.prompt_len} tokens", f"{model_config(args).num_params() / 1e6:.2f}M parameters",
               f"KL {args.kl_coef}", f"median of {args.iters} after {args.warmup} warm-up",
               f"ours: micro-batch {args.micro_batch}, prompt groups of {ours.prompt_group}, "
               f"{'recomputed' if args.recompute_old_logprobs else 'sampler'} old log-probs",
               f"tunix: micro-batch {args.tunix_micro_batch}", f"load average now {os.getloadavg()[0]:.2f}"]
    print("\nGRPO iteration: " + "; ".join(setting) + "\n")
    print(markdown_table(["", "ours", "tunix", "speed-up"], rows))


if __name__ == "__main__":
    main()
