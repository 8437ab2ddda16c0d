"""A run's working directory, local or in a bucket (gs://...).

Checkpoints go straight to the workdir (orbax writes to local disks and to GCS alike). Logs, plots,
samples and the export are written to a local folder first, because event files and JSONL logs are
appended to and object stores cannot append; for a remote workdir that folder is a mirror, copied up at
every checkpoint and at the end, and copied down when a run resumes on a fresh machine.
"""
from __future__ import annotations

import os
import re
import tempfile

import jax
from etils import epath


class Workdir:
    def __init__(self, path: str, mirror: str | None = None, remote: bool | None = None):
        self.path = path
        self.remote = "://" in path if remote is None else remote
        if self.remote:
            self.local = mirror or os.path.join(tempfile.gettempdir(), "sqlm_jax_mirror",
                                                re.sub(r"[^\w.-]+", "_", path))
            self.checkpoints = path.rstrip("/") + "/checkpoints"
        else:
            self.local = path
            self.checkpoints = os.path.join(os.path.abspath(path), "checkpoints")
        os.makedirs(self.local, exist_ok=True)

    def _files(self, root: epath.Path, relative: tuple[str, ...] = ()):
        """(file, path relative to root) for every file below `root`, checkpoints excepted.

        A walk by listing, because epath refuses recursive globs on buckets."""
        for item in (root.joinpath(*relative)).iterdir():
            parts = relative + (item.name,)
            if item.is_dir():
                if parts != ("checkpoints",):
                    yield from self._files(root, parts)
            else:
                yield item, epath.Path(*parts)

    def push(self) -> None:
        """Copies the local mirror up to the remote workdir (process 0 only)."""
        if not self.remote or jax.process_index() != 0:
            return
        for file, relative in self._files(epath.Path(self.local)):
            target = epath.Path(self.path) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            file.copy(target, overwrite=True)

    def pull(self) -> None:
        """Copies the remote workdir's logs down, so a resumed run appends to its own history."""
        if not self.remote or not epath.Path(self.path).exists():
            return
        for file, relative in self._files(epath.Path(self.path)):
            target = epath.Path(self.local) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            file.copy(target, overwrite=True)
