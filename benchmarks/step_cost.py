"""What a Mixture of Prompts costs per training step, as ratios measured in one run.

With l = g the layers below g run once, on the input alone, and the gate reads their
output, so a ``mops`` step should cost about what a ``single`` prompt step with the same
m costs (the target: at most 1.10x). ``attention`` mode prepends K*m positions instead
of m and is timed beside them. Steps of the configurations are interleaved and the
median of each is reported, so a noisy machine hits all of them alike.

    python benchmarks/step_cost.py            # writes benchmarks/results/step_cost_embedded.{md,json}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from mops.cli_common import run_cli, setup_logging
from mops.data import heldout_records
from mops.models import DEFAULT_MODEL, load_model
from mops.mixture import MixtureConfig
from mops.outputs import library_versions, write_json_atomic
from mops.train import TrainConfig, build_mixture, collate, trainable_groups
from mops.data import encode_example

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--name", default="embedded")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    setup_logging(quiet=True)
    torch.manual_seed(0)
    model, tok = load_model(args.model, device=args.device)
    records = heldout_records("dolly+natural-instructions", "train", limit=args.batch_size * 8)
    examples = [encode_example(tok, r, args.max_len) for r in records]
    batch = collate(examples[: args.batch_size], tok.pad_token_id, model.device)
    g = round(0.3 * model.config.num_hidden_layers)
    variants = {
        "single": MixtureConfig(1, args.prompt_len, "single", gate_layer=g, inject_layer=g),
        "mops-interpolate": MixtureConfig(args.experts, args.prompt_len, "mops", "interpolate", g, g),
        "mops-attention": MixtureConfig(args.experts, args.prompt_len, "mops", "attention", g, g),
    }
    steps = {}
    for name, config in variants.items():
        lm = build_mixture(model, tok, examples, config, seed=0)
        opt = torch.optim.AdamW(trainable_groups(lm, TrainConfig()))
        steps[name] = (lm, opt)

    def one_step(lm, opt):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = lm(batch["input_ids"], batch["attention_mask"], batch["gate_mask"], batch["labels"], return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for lm, opt in steps.values():  # warm-up
        one_step(lm, opt)
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, (lm, opt) in steps.items():
            times[name].append(one_step(lm, opt))
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "model": args.model, "device": str(model.device), "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "tokens_per_batch": int(batch["attention_mask"].sum()),
        "experts": args.experts, "prompt_len": args.prompt_len, "gate_layer": g, "inject_layer": g,
        "repeats": args.repeats, "median_seconds": median,
        "ratio_to_single": {name: median[name] / median["single"] for name in median},
        "versions": library_versions(),
    }
    out = Path(args.out_dir) / f"step_cost_{args.name}.json"
    write_json_atomic(out, result)
    lines = [
        f"# Training-step cost of a Mixture of Prompts on {args.model}",
        "",
        f"Made by `python benchmarks/step_cost.py` on {result['device']} ({result['threads']} threads): "
        f"batch of {args.batch_size} examples ({result['tokens_per_batch']} tokens), K = {args.experts}, "
        f"m = {args.prompt_len}, l = g = {g}; median of {args.repeats} interleaved steps "
        "(forward, backward, AdamW step).",
        "",
        "| variant | median step s | ratio to single |",
        "| --- | ---: | ---: |",
    ] + [f"| {n} | {median[n]:.3f} | {result['ratio_to_single'][n]:.3f} |" for n in median]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run_cli(main))
