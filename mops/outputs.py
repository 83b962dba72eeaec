"""Outputs that appear complete or not at all.

Every stage writes into a hidden temporary folder beside the destination and renames it
into place only when everything is written, so a crash never leaves a half-written
checkpoint that looks finished, and a failed run never damages what was there before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator

from mops.errors import UserError


@contextlib.contextmanager
def results_lock(out_json: Path) -> Iterator[None]:
    """Held while a run reads, merges and rewrites a results file, so that several runs of a
    benchmark (other settings, methods or seeds) can share it."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with open(out_json.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class SharedResults:
    """A benchmark's results file that several runs (other settings, methods or seeds, in other
    processes) fill together. ``results[table]`` maps a key to one finished entry; before
    deciding anything, and whenever it writes, a run takes in what the others saved, under
    :func:`results_lock`, and every write redraws the tables (``render(results, path)``)."""

    def __init__(self, path: Path, results: dict, table: str, render) -> None:
        self.path, self.results, self.table, self.render = Path(path), results, table, render

    def _merge(self) -> None:  # theirs first, so this run's entries win on a shared key
        if self.path.is_file():
            self.results[self.table] = json.loads(self.path.read_text()).get(self.table, {}) | self.results[self.table]

    def has(self, key: str) -> bool:
        """Whether any run has finished ``key`` (so this one skips it)."""
        with results_lock(self.path):
            self._merge()
        return key in self.results[self.table]

    def save(self, key: str, entry: dict) -> None:
        with results_lock(self.path):
            self._merge()
            self.results[self.table][key] = entry
            self._write()

    def redraw(self) -> None:
        """Write and render with every run's entries (and this run's other fields)."""
        with results_lock(self.path):
            self._merge()
            self._write()

    def _write(self) -> None:
        write_json_atomic(self.path, self.results)
        self.render(self.results, self.path)


def check_output_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Refuse, before any work starts, an output folder that already holds something."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose a new folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: folder already holds files; choose an empty or new folder, or pass --force")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on failure it is removed."""
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; outputs are meant to be shared
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("mops-toolkit", "torch", "transformers", "llmcompressor", "compressed-tensors", "datasets"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
