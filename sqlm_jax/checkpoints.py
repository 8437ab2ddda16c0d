"""Orbax checkpoints of a run: train states (params, optimizer state, step) plus JSON metadata, kept
so that nothing already saved is lost and every checkpoint failure is one line that names the fix.

The metadata holds everything else a resumed run needs to continue exactly (the RNG seed, the data
position, the evaluation history). Orbax's CheckpointManager writes each checkpoint under a temporary
name and renames it when complete, so an interrupted save never damages an earlier checkpoint; the
manager keeps the last `keep`. On top of it:
- each checkpoint gets an integrity record (`INTEGRITY_FILE`: size and CRC-32 of every file), written
  after the save completes; orbax itself reads overwritten array bytes back without complaint;
- `restore_latest` uses the newest checkpoint that is intact and restores cleanly; a damaged newer one
  is named in one warning line and moved to `<checkpoints>.damaged/`, never deleted;
- a checkpoint made for another model, critic, LoRA or optimizer is refused with the first leaf that
  differs, before any array is read;
- a failed save (no space, permission, a bucket error) removes its partial directory and raises one
  line with the path and the bytes needed and free; the older checkpoints stay as they were. What
  orbax's and tensorstore's writers print while they fail (dozens of tracebacks: asyncio's "Event loop
  is closed", RESOURCE_EXHAUSTED from the OCDBT writer) goes to a log file beside the checkpoints
  (`ERROR_LOG`, named in the line), not the console; `SQLM_JAX_DEBUG=1` shows it on the console.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
import traceback
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sqlm_jax.writer_reports import Reports, quiet

INTEGRITY_FILE = "sqlm_integrity.json"
ERROR_LOG = "checkpoint_errors.log"  # beside the checkpoints directory (the run's workdir)
_CHUNK = 1 << 24


class CheckpointProblem(RuntimeError):
    """A checkpoint that cannot be saved or resumed from; the message names the fix."""


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _files(root: epath.Path):
    """Every file below `root` (bucket-safe: a walk by listing), as paths relative to `root`."""
    for item in sorted(root.iterdir()):
        if item.is_dir():
            yield from (epath.Path(item.name) / f for f in _files(item))
        else:
            yield epath.Path(item.name)


def _crc32(path: epath.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def integrity_record(step_dir: epath.Path) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} for every file of a checkpoint directory."""
    return {str(f): [(step_dir / f).stat().length, _crc32(step_dir / f)]
            for f in _files(step_dir) if not f.name.startswith(INTEGRITY_FILE)}


def first_damage(step_dir: epath.Path) -> str | None:
    """What is wrong with a checkpoint directory by its integrity record, or None when it matches
    (or has no record: one killed between orbax's rename and the record is checked by restoring)."""
    record_file = step_dir / INTEGRITY_FILE
    if not record_file.exists():
        return None
    try:
        record = json.loads(record_file.read_text())
    except ValueError:
        return f"{INTEGRITY_FILE} is unreadable"
    for name, (size, crc) in record.items():
        file = step_dir / name
        if not file.exists():
            return f"{name} is missing"
        if file.stat().length != size:
            return f"{name} has {file.stat().length} bytes, {size} when saved"
        if _crc32(file) != crc:
            return f"{name} does not hold the bytes saved (CRC-32 differs)"
    return None


def _flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{orbax's leaf name, e.g. 'policy.params.embed.value': (shape, dtype)}."""
    flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True), sep=".")
    return {k: (tuple(v.shape), str(np.dtype(v.dtype))) for k, v in flat.items()
            if hasattr(v, "shape") and hasattr(v, "dtype")}


def tree_mismatch(saved_tree, wanted_tree) -> str | None:
    """The first difference between a checkpoint's array tree and the run's, in words, or None."""
    saved, wanted = _flat_shapes(saved_tree), _flat_shapes(wanted_tree)
    for group in ("critic", "lora"):
        has_saved, has_wanted = (any(f".{group}" in "." + k for k in t) for t in (saved, wanted))
        if has_saved != has_wanted:
            return (f"the checkpoint {'has' if has_saved else 'has no'} {group}, this run "
                    f"{'has' if has_wanted else 'has none'}")
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
        parts = [f"{len(missing)} arrays of this run are not in it (first: {missing[0]})" if missing else "",
                 f"{len(extra)} of its arrays are not in this run (first: {extra[0]})" if extra else ""]
        return "another structure (model, optimizer or LoRA settings): " + "; ".join(p for p in parts if p)
    # Weights before optimizer moments: a weight is what a user recognises (the model, the LoRA rank).
    for name in sorted(wanted, key=lambda k: (".opt_state." in f".{k}.", k)):
        shape, dtype = wanted[name]
        if saved[name] != (shape, dtype):
            return (f"{name} is {saved[name][1]}{list(saved[name][0])} there and {dtype}{list(shape)} in "
                    "this run")
    return None


def tree_bytes(tree) -> int:
    """Bytes of the arrays of a (possibly abstract) pytree: what one checkpoint of it holds."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
                   if hasattr(x, "shape")))


def free_bytes(directory: str) -> int | None:
    """Free bytes on the local file system holding `directory` (None for a bucket)."""
    if "://" in directory:
        return None
    path = epath.Path(directory)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(str(path)).free


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _is_no_space(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


class Checkpointer:
    def __init__(self, directory: str, *, keep: int):
        self.directory = epath.Path(directory)
        self.keep = keep
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        # Synchronous saves: a run saving on SIGTERM must have the checkpoint on disk before it exits.
        return ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, create=True, enable_async_checkpointing=False),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_space(self, state) -> None:
        """Warns (one line) when `keep + 1` checkpoints of `state` (the last ones plus the one being
        written) would not fit in the free space of the checkpoint directory's disk."""
        free, need = free_bytes(str(self.directory)), (self.keep + 1) * tree_bytes(state)
        if free is not None and need > free:
            _warn(f"checkpoints of this run take {_gib(tree_bytes(state))} each; checkpoint.keep="
                  f"{self.keep} (+1 being written) need {_gib(need)} but {self.directory} has {_gib(free)} "
                  "free: free space, lower --config.checkpoint.keep, or use another --config.workdir")

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        if step in self.manager.all_steps():
            return
        if os.environ.get("SQLM_JAX_DEBUG"):  # errors.DEBUG_VARIABLE: everything on the console, as raised
            try:
                self._save(step, state, meta)
            except Exception as e:
                raise CheckpointProblem(self._failed(step, state, e)) from e
        else:
            failure = None
            with Reports().held() as reports:
                try:
                    self._save(step, state, meta)
                except Exception as e:  # a disk, permission or bucket failure: the run cannot save
                    reports.settle()
                    failure = self._failed(step, state, e)
                    reports.texts.append("The failure itself:\n" + "".join(traceback.format_exception(e)))
                    del e
                if failure is not None:
                    details = reports.take()  # the records' tracebacks let go of the failed writers,
                    reports.settle()  # which are collected here, not at the exit (on the console)
                    details += reports.take()
            if failure is None:
                reports.replay()
            else:
                raise CheckpointProblem(failure + self._write_log(step, details))
        self._record_integrity(step)

    def _save(self, step: int, state, meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def _failed(self, step: int, state, e: BaseException) -> str:
        """Removes what the failed save of `step` left and says what happened, in one line."""
        self._remove_partial(step)
        free = free_bytes(str(self.directory))
        cause = "no space left on the device" if _is_no_space(e) else _one_line(e)
        return (f"saving the checkpoint of step {step} to {self.directory} failed ({cause}); it needs "
                f"about {_gib(tree_bytes(state))}" + (f", {_gib(free)} are free" if free is not None else "")
                + f"; the checkpoints already saved ({sorted(self.manager.all_steps()) or 'none'}) are "
                "intact: free space or fix the permissions and resume with --config.resume=True")

    def _write_log(self, step: int, text: str) -> str:
        """Appends the failed save's reports to ERROR_LOG beside the checkpoints (written once the
        partial checkpoint is gone, so a full disk has room for it); the words that name it."""
        if jax.process_index() != 0:
            return ""
        log = self.directory.parent / ERROR_LOG
        try:
            with log.open("a") as f:
                f.write(f"--- saving the checkpoint of step {step} ---\n{text}")
        except Exception:  # a bucket (no appending) or a disk still full: the one line is the report
            try:
                log.write_text(f"--- saving the checkpoint of step {step} ---\n{text}")
            except Exception:
                return ""
        return f"; details in {log}"

    def _record_integrity(self, step: int) -> None:
        if jax.process_index() == 0:
            step_dir = self.directory / str(step)
            partial = step_dir / (INTEGRITY_FILE + ".tmp")
            try:  # written aside and renamed: a kill mid-write leaves no half record to misread as damage
                partial.write_text(json.dumps(integrity_record(step_dir)))
                partial.rename(step_dir / INTEGRITY_FILE)
            except OSError as e:  # the checkpoint is complete; a restore will still check it by reading
                partial.unlink(missing_ok=True)
                _warn(f"checkpoint of step {step} saved without its integrity record ({_one_line(e)})")

    def _remove_partial(self, step: int) -> None:
        """Deletes the temporary directory a failed save of `step` left (orbax renames it to the step's
        name only once complete)."""
        if jax.process_index() == 0 and self.directory.exists():
            deadline = time.monotonic() + 5.0
            while partial := [item for item in self.directory.iterdir()
                              if item.name.startswith(f"{step}.") and "orbax-checkpoint-tmp" in item.name]:
                for item in partial:
                    item.rmtree(missing_ok=True)
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)  # a writer still finishing its array may create the directory again
        self.manager.reload()

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
        """The state at `step`, placed with the shardings of `abstract_state`, and its metadata.

        Raises CheckpointProblem when the checkpoint's arrays do not match `abstract_state`."""
        with quiet():
            saved = self.manager.item_metadata(step)["state"]
        if (mismatch := tree_mismatch(saved, abstract_state)) is not None:
            raise CheckpointProblem(
                f"the checkpoint of step {step} in {self.directory} does not match this run: {mismatch}; "
                "resume with the config it was made with (model.path, LoRA, critic, optimizer), or "
                "choose a fresh --config.workdir")
        with quiet():
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def restore_latest(self, abstract_state) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, metadata) of the newest checkpoint that is intact and restores; None when
        there is none. Damaged newer ones are moved aside with one warning line each; a checkpoint
        of another run's shapes raises CheckpointProblem (that is the config's fault, not damage)."""
        tried = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = first_damage(self.directory / str(step))
            if problem is None:
                try:
                    return (step, *self.restore(step, abstract_state))
                except CheckpointProblem:
                    raise
                except Exception as e:  # unreadable: damaged in a way the record could not see
                    problem = _one_line(e)
            tried.append(f"step {step}: {problem}")
            self._move_aside(step, problem)
        if tried:
            raise CheckpointProblem(
                f"no checkpoint in {self.directory} restores ({'; '.join(tried)}); they were moved to "
                f"{self._damaged_dir()}: start again with a fresh --config.workdir")
        return None

    def _damaged_dir(self) -> epath.Path:
        return self.directory.parent / (self.directory.name + ".damaged")

    def _move_aside(self, step: int, problem: str) -> None:
        target = self._damaged_dir() / str(step)
        suffix = 0
        while target.exists():  # never overwrite an earlier damaged copy
            suffix += 1
            target = target.parent / f"{step}.{suffix}"
        _warn(f"checkpoint of step {step} in {self.directory} is damaged ({problem}); moved to {target}, "
              "trying the one before it")
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"sqlm_jax moved checkpoint {step} aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
