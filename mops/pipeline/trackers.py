"""``--report-to tensorboard|mlflow|none``: training curves in the trackers people already use.

accelerate's own trackers (``TensorBoardTracker``, ``MLflowTracker``), fed from
:func:`mops.train.recover`'s ``on_step`` callback: per step the training loss, the
validation perplexity when the trainer has just measured it, and the gate's mean routed
weight on each expert. Both write local files under ``<out>/trackers/`` and need no
server or network: TensorBoard event files, and an MLflow SQLite database (MLflow 3 keeps
its plain-file store only in maintenance mode) with its artifact folder beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

REPORT_TO = ("none", "tensorboard", "mlflow")


def run_name(stage) -> str:
    """A tracker run per recovery stage: its label and key, in characters every tracker accepts."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stage.label) + "-" + stage.short


def make_tracker(report_to: str, out: Path, stage):
    from accelerate.tracking import MLflowTracker, TensorBoardTracker

    root = Path(out) / "trackers"
    if report_to == "tensorboard":
        tracker = TensorBoardTracker(run_name(stage), root / "tensorboard")
    else:
        import mlflow

        (root / "mlflow").mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{(root / 'mlflow' / 'mlflow.db').resolve()}")
        tracker = MLflowTracker(experiment_name="mops-run", logging_dir=str((root / "mlflow" / "artifacts").resolve()),
                                run_name=run_name(stage))
    tracker.start()
    tracker.store_init_configuration(flat(stage.settings))
    return tracker


def flat(settings: dict, prefix: str = "") -> dict:
    """Nested settings -> ``{"training/lr": 0.03, ...}`` of the plain values trackers store."""
    out = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat(value, f"{name}/")
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)  # None and lists: as text
    return out


class StepLogger:
    """``recover(..., on_step=StepLogger(...))``: logs each step's numbers to every tracker."""

    def __init__(self, trackers):
        self.trackers = trackers
        self.logged_validation = set()

    def __call__(self, step: int, history: dict) -> None:
        values = {"train/loss": history["train_loss"][-1]}
        usage = history.get("expert_usage")
        if usage:
            values |= {f"gate/expert_{k}_weight": float(w) for k, w in enumerate(usage[-1])}
        for tracker in self.trackers:
            tracker.log(values, step=step)
        for v in history.get("validation", []):  # the step-0 measurement too, on the first call
            if v["step"] not in self.logged_validation and v["step"] <= step:
                self.logged_validation.add(v["step"])
                for tracker in self.trackers:
                    tracker.log({"validation/ppl": v["ppl"]}, step=v["step"])

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
