"""What a stage depends on, reduced to short digests that go into its key.

Hashing a 13 GB checkpoint on every run would cost more than some stages, so a weights
file is fingerprinted by its size and its first and last MiB (a re-saved or different
checkpoint changes these); every small file (configs, tokenizer) is hashed whole.
Instruction data is hashed record by record, after loading, so the key follows the records
a stage really reads, whatever files they came from.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

WHOLE_BELOW = 1 << 20  # files up to 1 MiB are hashed whole
EDGE = 1 << 20


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as f:
        if size <= WHOLE_BELOW:
            digest.update(f.read())
        else:
            digest.update(f.read(EDGE))
            f.seek(size - EDGE)
            digest.update(f.read(EDGE))
    return digest.hexdigest()


def folder_fingerprint(folder) -> dict[str, str]:
    """``{relative path: digest}`` of every file under ``folder`` (hidden ones left out)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def records_sha256(records) -> str:
    """The digest ``mops.train.run_fingerprint`` also takes of training records."""
    return hashlib.sha256(json.dumps([r.to_dict() for r in records]).encode()).hexdigest()


def canonical_sha256(obj) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no spaces): equal settings, equal key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def versions(distributions) -> dict[str, str]:
    out = {}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
