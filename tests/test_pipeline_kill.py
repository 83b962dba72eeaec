"""``kill -9`` inside each stage of mops-run, then the same command: the job finishes without
redoing finished stages, a half-written stage is never taken as finished, an interrupted
recovery resumes from its checkpoint, and the report's numbers equal an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mops.pipeline.cli import entry

RECIPE = """\
model: {model}
out: {out}
data:
  sources: [dolly, natural-instructions]
  limit_per_source: 48
prune:
  - method: magnitude
    pattern: 2:4
recover:
  budget: {{n_experts: 2, prompt_len: 2}}
  training: {{steps: 6, batch_size: 2, eval_every: 3, eval_examples: 4, gate_pretrain_steps: 2,
             gate_pretrain_examples: 16, max_len: 64, checkpoint_every: 1}}
  snapshot_examples: 8
  methods: [{{name: mops}}]
evaluate:
  wikitext: {{seq_len: 64, windows: 4}}
  response: {{examples: 8}}
  resamples: 200
"""
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def numbers(out: Path) -> list[dict]:
    rows = json.loads((out / "report.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k not in ("train_seconds", "resumed_from_step")} for r in rows]


def half_written(out: Path, kind: str) -> bool:
    """A stage of ``kind`` is being written: its temporary folder exists."""
    folder = out / "stages" / kind
    return folder.is_dir() and any(p.name.startswith(".") and ".tmp-" in p.name for p in folder.iterdir())


def checkpoint_step(out: Path) -> int:
    states = list((out / "stages" / "recover").glob(".*.checkpoint/trainer_state.json")) if (out / "stages").is_dir() else []
    return max((json.loads(p.read_text())["step"] for p in states), default=-1)


def finished(out: Path, kind: str) -> int:
    folder = out / "stages" / kind
    return sum((p / "stage.json").is_file() for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else 0


def run_until_killed(recipe: str, out: Path, moment, log: Path) -> None:
    """Start ``mops-run`` and SIGKILL it at ``moment()``; fail if it finished first."""
    with open(log, "a") as output:
        proc = subprocess.Popen([sys.executable, "-m", "mops.pipeline.cli", recipe, "--out", str(out), "--quiet"],
                                env=ENV, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if moment():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.005)
        else:
            proc.kill()
            raise AssertionError(f"mops-run ended (rc {proc.returncode}) before the moment to kill it:\n"
                                 + log.read_text()[-3000:])
    assert proc.returncode == -signal.SIGKILL
    for folder in (out / "stages").glob("*/*"):  # whatever is there as a stage is finished
        assert folder.name.startswith(".") or (folder / "stage.json").is_file(), folder


def test_a_run_killed_inside_each_stage_resumes_to_the_same_report(tmp_path, tiny_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny_dir, out=tmp_path / "reference"))
    assert entry([str(recipe), "--quiet"]) == 0  # the uninterrupted run
    out, log = tmp_path / "killed", tmp_path / "killed.log"

    run_until_killed(str(recipe), out, lambda: half_written(out, "eval"), log)  # the dense model's evaluation
    assert finished(out, "eval") == 0
    run_until_killed(str(recipe), out, lambda: half_written(out, "prune"), log)
    assert finished(out, "eval") == 1 and finished(out, "prune") == 0
    run_until_killed(str(recipe), out, lambda: checkpoint_step(out) >= 2, log)  # mid-training
    assert finished(out, "recover") == 0 and finished(out, "eval") == 2
    killed_at = checkpoint_step(out)
    run_until_killed(str(recipe), out, lambda: finished(out, "recover") and half_written(out, "eval"), log)
    assert finished(out, "eval") == 2 and not list((out / "stages" / "recover").glob(".*.checkpoint"))
    run_until_killed(str(recipe), out, lambda: half_written(out, "report"), log)
    assert finished(out, "report") == 0 and not (out / "report.json").exists()

    done = subprocess.run([sys.executable, "-m", "mops.pipeline.cli", str(recipe), "--out", str(out), "--quiet"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 to run, 5 reused" in done.stdout  # only the report was left
    recover = json.loads(next((out / "stages" / "recover").glob("*/stage.json")).read_text())
    assert 2 <= recover["result"]["resumed_from_step"] <= killed_at  # continued from its checkpoint
    assert numbers(out) == numbers(tmp_path / "reference")
    leftovers = [p.name for p in (out / "stages").glob("*/.*")]
    assert leftovers == [], leftovers
