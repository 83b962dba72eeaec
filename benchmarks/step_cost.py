"""What a recovery training step costs, as ratios measured side by side in one run.

The step (forward, backward, AdamW) on the same batches of the train split (K = 4, m = 10,
l = g = round(0.3 L), 4 examples of at most 256 tokens), in four ways:

- ``padded`` -- the step as it was at commit 0b7bc88: a right-padded batch through
  ``PromptedLM.forward`` (still the path of generation and lm-eval), the frozen layers
  below l run at every step;
- ``packed`` -- ``PromptedLM.forward_examples``: the batch packed into one sequence (no
  padding; a prompt shared by every input runs once), lower layers still run every step;
- ``packed+stored`` -- the same with the lower layers' states taken from a warm
  ``mops.lower_cache.LowerStates``, as in training after an example's first visit and in
  the recovery study, whose methods share one store per pruned model;
- ``peft`` -- PEFT prompt tuning (``get_peft_model`` with ``PromptTuningConfig``, K*m
  virtual tokens at the input, the same padded batch, labels masked on the instruction).

``packed+stored+bf16`` is the default mixture's stored step under bfloat16 autocast
(``mops-recover --mixed-precision bf16``): the upper layers' matrix products in bfloat16,
which pays where the CPU has bfloat16 instructions (AVX512-BF16, AMX) or on a GPU.
``--compile`` adds ``packed+stored+compile`` (the upper layers under ``torch.compile``;
its one-off compile time is reported beside it). The variants are interleaved batch by
batch and the median of each is reported, so a noisy machine hits all of them alike.

Then what each recovery method costs a server: the prompt positions it adds to every
request and its prefill speed (instruction tokens per second through the whole model,
the head excepted, in batches of 8 held-out instructions of similar length), every method
of the recovery study built at the study's budget and timed interleaved, batch by batch.
Untrained tensors cost what trained ones do.

    python benchmarks/step_cost.py            # writes benchmarks/results/step_cost_embedded.{md,json}
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from mops.baselines import METHODS, Budget, prepare
from mops.cli_common import run_cli, setup_logging
from mops.data import encode_example, format_prompt, load_records, split_records
from mops.lower_cache import LowerStates
from mops.mixture import MixtureConfig
from mops.models import DEFAULT_MODEL, load_model
from mops.outputs import library_versions, write_json_atomic
from mops.injection import PromptedLM
from mops.train import BatchOrder, TrainConfig, build_mixture, collate, trainable_groups

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--name", default="embedded")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--batches", type=int, default=12, help="timed batches (the first steps of seed 0)")
    p.add_argument("--compile", action="store_true", help="also time the upper layers under torch.compile")
    p.add_argument("--prefill-examples", type=int, default=64, help="held-out instructions timed per method")
    p.add_argument("--prefill-repeats", type=int, default=3, help="passes over them, interleaved across methods")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    setup_logging(quiet=True)
    torch.manual_seed(0)
    model, tok = load_model(args.model, device=args.device)
    splits = split_records(load_records(["dolly", "natural-instructions"]), 0)
    train = splits["train"]
    examples = [encode_example(tok, r, args.max_len) for r in train]
    order = BatchOrder(len(examples), args.batch_size, 1, 0)
    batches = [[examples[i] for i in order.indices(s, 0)] for s in range(args.batches + 1)]  # +1 warm-up
    g = round(0.3 * model.config.num_hidden_layers)
    K, m = args.experts, args.prompt_len
    mixtures = {
        "mops-attention": MixtureConfig(K, m, "mops", "attention", g, g),
        "mops-interpolate": MixtureConfig(K, m, "mops", "interpolate", g, g),
        "prompt-equal": MixtureConfig(1, K * m, "single", gate_layer=g, inject_layer=g),
    }
    store = LowerStates()
    steps = {}
    for name, config in mixtures.items():
        lm = build_mixture(model, tok, examples, config, seed=0)
        opt = torch.optim.AdamW(trainable_groups(lm, TrainConfig()))
        for batch in batches:
            store.states(lm, batch)  # warm: every timed example's lower states are stored
        steps[f"{name} padded"] = padded_step(lm, opt, tok.pad_token_id)
        steps[f"{name} packed"] = packed_step(lm, opt, None)
        steps[f"{name} packed+stored"] = packed_step(lm, opt, store)
        if name == "mops-attention":
            steps[f"{name} packed+stored+bf16"] = packed_step(lm, opt, store, bf16=True)
    steps["peft prompt tuning"] = peft_step(model, K * m, tok.pad_token_id)
    compile_seconds = None
    if args.compile:
        compiled = copy.deepcopy(model)
        for layer in compiled.model.layers[g:]:
            layer.forward = torch.compile(layer.forward, dynamic=True)
        lm = build_mixture(compiled, tok, examples, mixtures["mops-attention"], seed=0)
        opt = torch.optim.AdamW(trainable_groups(lm, TrainConfig()))
        step = packed_step(lm, opt, store)
        start = time.perf_counter()
        for batch in batches[:2]:  # two shapes: the first compile is static, the second dynamic
            step(batch)
        compile_seconds = time.perf_counter() - start
        steps["mops-attention packed+stored+compile"] = step

    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    times = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step(batch)
            sync()
            if i:  # batch 0 warms every variant up
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    new = median["mops-attention packed+stored"]
    inference = prefill_costs(args.model, args.device, splits["test"][: args.prefill_examples], args.prefill_repeats,
                              Budget(MixtureConfig(K, m, gate_layer=g, inject_layer=g)))
    result = {
        "model": args.model, "device": str(model.device), "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "batch_size": args.batch_size, "max_len": args.max_len, "batches": args.batches,
        "tokens_per_batch": statistics.mean(sum(len(e.input_ids) for e in b) for b in batches[1:]),
        "padded_tokens_per_batch": statistics.mean(len(b) * max(len(e.input_ids) for e in b) for b in batches[1:]),
        "experts": K, "prompt_len": m, "gate_layer": g, "inject_layer": g,
        "median_seconds": median, "compile_seconds": compile_seconds,
        "speedup_over_padded": {n: median[f"{n} padded"] / median[f"{n} packed+stored"] for n in mixtures},
        "peft_over_ours": median["peft prompt tuning"] / new,
        "inference": inference, "prefill_examples": args.prefill_examples, "prefill_repeats": args.prefill_repeats,
        "versions": library_versions(),
    }
    out = Path(args.out_dir) / f"step_cost_{args.name}.json"
    write_json_atomic(out, result)
    text = markdown(result, K * m)
    out.with_suffix(".md").write_text(text)
    print(text)


def prefill_costs(model_spec, device, records, repeats: int, budget: Budget) -> dict:
    """Per method: prompt positions added, median prefill tokens/s over ``repeats`` interleaved passes."""
    methods = {}
    for method in METHODS:
        model, tok = load_model(model_spec, device=device)  # LoRA goes inside the model: a copy each
        mixture, extra, _ = prepare(method, model, budget)
        lm = PromptedLM.bare(model) if mixture is None else build_mixture(model, tok, [], mixture, seed=0,
                                                                          initialise=False, empty_ok=True)
        methods[method] = lm.eval()
    prompts = sorted((format_prompt(r) for r in records), key=len)
    batches = [tok(prompts[s : s + 8], return_tensors="pt", padding=True).to(device) for s in range(0, len(prompts), 8)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    seconds = {name: [] for name in methods}
    for _ in range(repeats):
        for name, lm in methods.items():
            started = time.perf_counter()
            for b in batches:
                prefill(lm, b["input_ids"], b["attention_mask"])
            seconds[name].append(time.perf_counter() - started)
    return {name: {"positions_added": lm.mixture.prompt_positions, "prefill_tokens_per_s": tokens / statistics.median(s)}
            for (name, lm), s in zip(methods.items(), seconds.values())}


@torch.no_grad()
def prefill(lm: PromptedLM, input_ids, attention_mask) -> None:
    """What a server runs before the first token: gate, prompt and every layer (no head)."""
    keys = attention_mask.bool()
    hidden, gate_states, positions = lm.lower(input_ids, attention_mask)
    _, prompt, bias = lm.mix(gate_states, keys, len(keys))
    lm.upper(hidden, keys, positions, prompt, bias)


def padded_step(lm, opt, pad_id):
    def step(batch):
        b = collate(batch, pad_id, lm.base.device)
        out = lm(b["input_ids"], b["attention_mask"], b["gate_mask"], b["labels"], return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def packed_step(lm, opt, store, bf16: bool = False):
    """``bf16``: the forward under bfloat16 autocast, as ``--mixed-precision bf16`` runs it
    (accelerate's autocast; the backward outside it, the prompts and AdamW in float32)."""
    device = lm.base.device.type

    def step(batch):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = lm.forward_examples(batch, lower=store)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def peft_step(model, n_virtual: int, pad_id: int):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    peft = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                    num_virtual_tokens=n_virtual))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad])

    def step(batch):
        b = collate(batch, pad_id, model.device)
        out = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def markdown(r: dict, n_virtual: int) -> str:
    med = r["median_seconds"]
    rows = [f"| {name} | {seconds:.3f} | {med['mops-attention padded'] / seconds:.2f}x |" for name, seconds in med.items()]
    lines = [
        f"# Training-step cost on {r['model']}",
        "",
        f"Made by `python benchmarks/step_cost.py{' --compile' if r['compile_seconds'] is not None else ''}` on "
        f"{r['device']} ({r['threads']} threads, CPU capability {r.get('cpu_capability', '?')}): the first {r['batches']} steps of seed 0, batches of "
        f"{r['batch_size']} train examples of at most {r['max_len']} tokens ({r['tokens_per_batch']:.0f} tokens a batch "
        f"on average, {r['padded_tokens_per_batch']:.0f} padded), K = {r['experts']}, m = {r['prompt_len']}, "
        f"l = g = {r['gate_layer']}; median of the interleaved steps (forward, backward, AdamW step). `padded` is the "
        "step of commit 0b7bc88; `packed` packs the batch into one sequence; `stored` takes the frozen lower "
        "layers' states from a warm store; `bf16` runs the forward under bfloat16 autocast "
        f"(`--mixed-precision bf16`); PEFT prompt tuning has {n_virtual} virtual tokens at the input.",
        "",
        "| variant | median step s | speed-up over mops-attention padded |",
        "| --- | ---: | ---: |",
        *rows,
        "",
        "Speed-up of the packed, stored step over the padded one: "
        + ", ".join(f"{n} {v:.2f}x" for n, v in r["speedup_over_padded"].items())
        + f". PEFT prompt tuning's step over ours (mops-attention): {r['peft_over_ours']:.2f}x.",
    ]
    if r["compile_seconds"] is not None:
        lines.append(f"torch.compile took {r['compile_seconds']:.0f} s before its first step.")
    none = r["inference"]["none"]["prefill_tokens_per_s"]
    lines += ["", "## What each recovery method costs a server", "",
              f"Prefill of the instructions of {r['prefill_examples']} held-out test examples (batches of 8, padded; "
              f"gate, prompt and every layer, no head), median of {r['prefill_repeats']} passes interleaved across "
              "the methods, each built at the study's budget (untrained tensors cost what trained ones do).", "",
              "| method | positions added per request | prefill tokens/s | vs none |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {c['positions_added']} | {c['prefill_tokens_per_s']:.0f} | "
              f"{c['prefill_tokens_per_s'] / none:.2f}x |" for name, c in r["inference"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run_cli(main))
