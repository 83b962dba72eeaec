"""The stage cache: one folder per stage, named by a hash of what the stage depends on.

A stage's key is the SHA-256 of its kind, its version, its own settings (resolved: the
stages' dataclass defaults included), the keys of the stages it reads, and the versions of
the libraries that shape its numbers. Its folder ``stages/<kind>/<key[:16]>/`` is built in
a hidden temporary folder beside it and renamed into place, ``stage.json`` written last
inside it, so a folder that exists is finished: a ``kill -9`` at any moment leaves at most
a temporary folder, which the next run removes and redoes. A recovery stage also keeps a
training checkpoint beside its folder (``.<key[:16]>.checkpoint``) that the next run
resumes from, and removes once the stage is finished.

Only one ``mops-run`` works in an output folder at a time (an advisory lock), which is what
makes removing leftover temporary folders safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mops.errors import UserError
from mops.outputs import atomic_dir
from mops.pipeline.fingerprints import canonical_sha256, versions

STAGE_JSON = "stage.json"
OWNER_FILE = ".mops-run"  # marks an output folder as mops-run's, so it may reuse what is there
LOCK_FILE = ".mops-run.lock"


@dataclass
class Stage:
    """One step of the plan. ``settings``, ``inputs`` and the library versions make its key;
    ``needs`` and ``spec`` are what the code running it reads (never hashed directly)."""

    kind: str  # prune | recover | eval | report
    label: str  # how the plan and the report name it: "sparsegpt-2of4/mops"
    version: int  # bump when the stage's outputs change meaning
    settings: dict
    inputs: dict[str, str]  # name -> key of what it reads
    libraries: tuple[str, ...]
    needs: dict = field(default_factory=dict)  # name -> Stage
    spec: dict = field(default_factory=dict)
    key: str = ""

    def __post_init__(self):
        self.versions = versions(self.libraries)
        self.key = canonical_sha256({"kind": self.kind, "version": self.version, "settings": self.settings,
                                     "inputs": self.inputs, "libraries": self.versions})

    @property
    def short(self) -> str:
        return self.key[:12]


class Store:
    def __init__(self, out):
        self.out = Path(out)
        self.root = self.out / "stages"

    def folder(self, stage: Stage) -> Path:
        return self.root / stage.kind / stage.key[:16]

    def checkpoint(self, stage: Stage) -> Path:
        return self.root / stage.kind / f".{stage.key[:16]}.checkpoint"

    def done(self, stage: Stage) -> bool:
        mark = self.folder(stage) / STAGE_JSON
        return mark.is_file() and json.loads(mark.read_text())["key"] == stage.key

    def record(self, stage: Stage) -> dict:
        return json.loads((self.folder(stage) / STAGE_JSON).read_text())

    def check_owner(self) -> None:
        """Refuse (before anything runs) a folder that holds files mops-run did not write."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"out: {str(out)!r} is a file; expected a folder path (new, empty, or an earlier mops-run's)")
        if out.is_dir() and any(out.iterdir()) and not (out / OWNER_FILE).is_file():
            raise UserError(f"out: {str(out)!r} holds files mops-run did not write; choose a new or empty folder")

    @contextlib.contextmanager
    def session(self):
        """Hold the folder's lock for a run; remove what killed runs left half-written."""
        self.check_owner()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.out / OWNER_FILE).write_text("written by mops-run; its stage cache is stages/\n")
        with open(self.out / LOCK_FILE, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"out: {str(self.out)!r} is in use by another mops-run; wait for it to finish") from None
            self._remove_leftovers()
            yield self

    def _remove_leftovers(self) -> None:
        for kind in (p for p in self.root.iterdir() if p.is_dir()):
            for p in kind.iterdir():
                if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                    shutil.rmtree(p, ignore_errors=True)  # a killed run's half-written stage
                elif p.name.endswith(".checkpoint") and (kind / p.name[1:-len(".checkpoint")] / STAGE_JSON).is_file():
                    shutil.rmtree(p, ignore_errors=True)  # the stage finished; its checkpoint is spent
        for p in self.out.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                p.unlink(missing_ok=True) if p.is_file() else shutil.rmtree(p, ignore_errors=True)

    def build(self, stage: Stage, make, **record) -> dict:
        """Run ``make(tmp) -> result`` in a temporary folder; write stage.json last; rename into place."""
        with atomic_dir(self.folder(stage), force=True) as tmp:
            result = make(tmp)
            (tmp / STAGE_JSON).write_text(json.dumps({
                "key": stage.key, "kind": stage.kind, "label": stage.label, "version": stage.version,
                "settings": stage.settings, "inputs": stage.inputs, "libraries": stage.versions,
                "result": result, **record}, indent=2, default=str) + "\n")
        shutil.rmtree(self.checkpoint(stage), ignore_errors=True)
        return self.record(stage)

    def link(self, name: str, target: Path) -> Path:
        """A stable name under the output folder (``pruned/sparsegpt-2of4``) for a finished stage's
        folder, whose own name is a hash; relative, so the output folder may move."""
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(target, path.parent))
        if path.is_dir() and not path.is_symlink():  # a copy of the folder made without links
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    def publish(self, name: str, source: Path) -> Path:
        """Copy a finished file to the top of the output folder, replacing the old one atomically."""
        target = self.out / name
        tmp = self.out / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return target
