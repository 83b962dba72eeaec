"""Per-step seconds of the real training loop (``mops.train.recover``), float32 against
bfloat16 autocast, with the lower-layer store cold and warm.

``benchmarks/step_cost.py`` times isolated steps on a warm store; this times the loop a run
goes through (accelerate, the gate, AdamW, bookkeeping), from one step's end to the next,
on the default mixture without gate pretraining or validation. Four runs in one process,
each from a freshly loaded base, the same batches (seed 0): float32 with a cold store (every
example's first visit runs the frozen lower layers, as in a 200-step run, which sees 800
distinct examples), then bf16, float32 and bf16 again on the store the first run filled.

    python benchmarks/loop_cost.py --base runs/demo/pruned/sparsegpt-2of4 --steps 25
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from mops.cli_common import run_cli, setup_logging
from mops.data import load_records, split_records
from mops.lower_cache import LowerStates
from mops.mixture import MixtureConfig
from mops.models import DEFAULT_MODEL, load_model
from mops.train import TrainConfig, recover

RUNS = [("float32, cold store", "no"), ("bf16, warm store", "bf16"), ("float32, warm store", "no"),
        ("bf16, warm store (again)", "bf16")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=DEFAULT_MODEL, help="the (pruned) model to train on")
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args(argv)
    setup_logging(quiet=True)
    splits = split_records(load_records(["dolly", "natural-instructions"]), 0)
    splits = {"train": splits["train"], "validation": []}  # no validation inside the loop
    store = LowerStates()
    print("| run | median step s | mean | max |\n| --- | ---: | ---: | ---: |")
    for label, precision in RUNS:
        model, tok = load_model(args.base)
        ends = []
        config = TrainConfig(steps=args.steps, gate_pretrain_steps=0, mixed_precision=precision)
        recover(model, tok, splits, MixtureConfig(), config, progress=False, lower=store,
                on_step=lambda step, history: ends.append(time.perf_counter()))
        seconds = [b - a for a, b in zip(ends, ends[1:])]
        print(f"| {label} | {statistics.median(seconds):.3f} | {statistics.mean(seconds):.3f} | {max(seconds):.3f} |",
              flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))
