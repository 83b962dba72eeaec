"""What a pruning run is asked to do, validated before any work starts."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from mops.errors import UserError

METHODS = ("sparsegpt", "wanda", "magnitude")
#: The mission's settings; any N:M with 0 < N < M and any sparsity in (0, 1) also work.
MISSION_SETTINGS = ("0.75", "0.85", "0.90", "2:4", "4:8", "3:4", "7:8")


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: N of every M consecutive input-dimension weights are zero."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise UserError(f"--pattern {text!r}: expected N:M with whole numbers, e.g. 2:4, 4:8, 3:4 or 7:8")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise UserError(f"--pattern {text!r}: expected 0 < N < M (N zeros in every M weights), e.g. 2:4, 4:8, 3:4 or 7:8")
    return n, m


@dataclass
class PruneConfig:
    method: str = "sparsegpt"
    sparsity: float | None = None  # unstructured target, in (0, 1)
    pattern: tuple[int, int] | None = None  # N:M, N zeros of every M
    calib: str = "dolly"
    calib_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    dampening: float = 0.01  # SparseGPT's Hessian dampening, a fraction of its mean diagonal
    calib_batch_size: int = 8  # samples per calibration forward; same statistics, fewer Python round trips

    def __post_init__(self):
        if isinstance(self.pattern, str):
            self.pattern = parse_pattern(self.pattern)
        elif self.pattern is not None:
            self.pattern = parse_pattern(f"{self.pattern[0]}:{self.pattern[1]}")
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if (self.sparsity is None) == (self.pattern is None):
            raise UserError("give exactly one of --sparsity S (unstructured, 0 < S < 1) or --pattern N:M")
        if self.sparsity is not None and not 0.0 < float(self.sparsity) < 1.0:
            raise UserError(f"--sparsity {self.sparsity}: expected a fraction strictly between 0 and 1, e.g. 0.75")
        for name in ("calib_samples", "seq_len", "calib_batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a positive whole number")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"

    @property
    def target_sparsity(self) -> float:
        return self.pattern[0] / self.pattern[1] if self.pattern else float(self.sparsity)

    @property
    def setting(self) -> str:
        """How tables name this setting: ``"2:4"`` or ``"0.75"``."""
        return f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else f"{self.sparsity:.2f}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pattern"] = self.setting if self.pattern else None
        return d
