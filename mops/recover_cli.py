"""``mops-recover``: train a Mixture of Prompts on a frozen (pruned) checkpoint.

The base model is loaded frozen and never changes (its weights, and so its sparsity,
are bitwise the same after training). The adapter folder (``mops_config.json`` +
``mops_model.safetensors`` + ``history.json``, and with a gate, ``gate_snapshots.json`` +
``gate_heatmap.png``: the gate's average weights per test category and expert before
training, after gate pretraining, midway and at the end) is written atomically; while training,
checkpoints go to a hidden folder beside it, which ``--resume`` continues from.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from mops.adapter import read_source_prompt, save_adapter, weights_hash
from mops.cli_common import held_out_line, run_cli, setup_logging
from mops.data import load_records, split_records, stratified_subset
from mops.distill import TeacherTargets, require_teacher
from mops.eval.perplexity import RESPONSE_MAX_LEN, response_perplexity
from mops.errors import UserError
from mops.mixture import COMBINES, GATES, MixtureConfig
from mops.models import load_model
from mops.outputs import check_output_dir
from mops.train import LR_SCHEDULES, MIXED_PRECISION, TrainConfig, recover

EPILOG = """example (the README's main job, after `prune`):
  mops-recover --base runs/demo/pruned/sparsegpt-2of4 --data dolly --data natural-instructions \\
      --experts 4 --prompt-len 10 --out runs/my-mops
"""


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="mops-recover", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the (pruned) checkpoint to steer: a folder, .gguf, or smollm2-135m")
    p.add_argument("--data", action="append", required=True,
                   help="instruction source, repeatable: dolly, natural-instructions, gsm8k, alpaca-eval, mmlu, "
                        "a .jsonl path [#field=key,...], or hf:org/name")
    p.add_argument("--limit-per-source", type=int, help="at most this many records of each source, stratified by "
                   "category (default: all); the train/validation/test split is then made from them, with --seed")
    c = MixtureConfig()
    m = p.add_argument_group("the mixture (defaults: the configuration the recovery study chose on validation)")
    m.add_argument("--experts", type=int, default=c.n_experts, help=f"K, the number of prompt experts (default: {c.n_experts})")
    m.add_argument("--prompt-len", type=int, default=c.prompt_len, help=f"m, vectors per expert (default: {c.prompt_len})")
    m.add_argument("--gate", default=c.gate, help=f"{', '.join(GATES)}: the MoPs gate, ATTEMPT's attention "
                   f"gate, fixed equal weights, or one prompt (K = 1) (default: {c.gate})")
    m.add_argument("--combine", default=c.combine, help=f"{', '.join(COMBINES)}: prepend the weighted sum of "
                   "the experts (m positions), or all K*m vectors with log-weights on the attention "
                   f"(default: {c.combine})")
    m.add_argument("--gate-layer", type=int, help="g: the gate reads the states entering layer g (default: round(0.3 L))")
    m.add_argument("--inject-layer", type=int, help="l: the prompt is prepended entering layer l; 0 is classic "
                   "prompt tuning (default: g)")
    m.add_argument("--source-prompt", action="append", default=[], metavar="ADAPTER",
                   help="a single-prompt adapter (from --gate single) on the same base, repeatable: becomes a "
                        "frozen expert, so a mixture can be composed from prompts trained earlier")
    m.add_argument("--gate-hidden", type=int, default=c.gate_hidden, help="r, the MoPs gate MLP's hidden width; 0 is "
                   f"SMoP's linear router (default: {c.gate_hidden})")
    m.add_argument("--temperature", type=float, default=c.temperature,
                   help=f"tau of the MoPs gate's softmax (default: {c.temperature})")
    m.add_argument("--top-k", type=int, default=c.top_k, help="sparse routing (SMoP): keep each input's k largest "
                   "gate weights, unrenormalised (default: all K, soft routing)")
    m.add_argument("--shared-len", type=int, default=c.shared_len, help="S vectors of a shared prompt every input "
                   f"gets in full, before the routed experts (default: {c.shared_len})")
    m.add_argument("--router-noise", type=float, default=c.router_noise, help="SMoP's relative Gaussian noise on "
                   f"the gate logits while training, logits * (1 + sigma N(0, 1)) (default: {c.router_noise})")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help=f"examples per micro-batch (default: {d.batch_size})")
    t.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step (default: 1)")
    t.add_argument("--lr", type=float, default=d.lr, help=f"experts' learning rate (default: {d.lr})")
    t.add_argument("--lr-schedule", default=d.lr_schedule, help=f"{', '.join(LR_SCHEDULES)}: cosine decays every "
                   f"learning rate to 0 over the run's steps (default: {d.lr_schedule})")
    t.add_argument("--lr-warmup", type=int, default=d.lr_warmup, help="steps over which every learning rate rises "
                   f"linearly to its value, 1/N of it at the first (default: {d.lr_warmup})")
    t.add_argument("--lora-lr", type=float, default=d.lora_lr, help="LoRA's learning rate (with --method lora or "
                   f"lora-equal) (default: {d.lora_lr})")
    t.add_argument("--gate-lr", type=float, default=d.gate_lr, help="gate's learning rate in joint training; 0 keeps "
                   f"the gate as pretrained (default: {d.gate_lr})")
    t.add_argument("--warm-steps", type=int, default=d.warm_steps, help="steps with the gate held uniform before it "
                   f"routes (in attention mode: one K*m prompt, then split into K experts) (default: {d.warm_steps})")
    t.add_argument("--balance", type=float, default=d.balance, help="weight of the load-balancing term "
                   f"K * sum_k f_k P_k (default: {d.balance})")
    t.add_argument("--distill", type=float, default=d.distill, help="weight a of KL(dense || recovered) in the loss, "
                   f"the response NLL's 1 - a; needs --teacher (default: {d.distill})")
    t.add_argument("--teacher", help="the dense checkpoint the base was pruned from, which --distill trains toward "
                   "(a folder, .gguf, or smollm2-135m)")
    t.add_argument("--gate-pretrain-steps", type=int, default=d.gate_pretrain_steps,
                   help=f"steps of gate pretraining on category labels, experts frozen; 0 skips it (default: {d.gate_pretrain_steps})")
    t.add_argument("--gate-pretrain-examples", type=int, default=d.gate_pretrain_examples,
                   help="training records the gate is pretrained on, stratified (with --federated: in all, each client "
                        f"its share by example count) (default: {d.gate_pretrain_examples})")
    t.add_argument("--gate-pretrain-lr", type=float, default=d.gate_pretrain_lr,
                   help=f"the gate's learning rate while pretraining on categories (default: {d.gate_pretrain_lr})")
    t.add_argument("--max-len", type=int, default=d.max_len, help=f"tokens per example (default: {d.max_len})")
    t.add_argument("--eval-every", type=int, default=d.eval_every, help=f"validation perplexity every N steps (default: {d.eval_every})")
    t.add_argument("--eval-examples", type=int, default=d.eval_examples, help=f"validation examples, stratified (default: {d.eval_examples})")
    t.add_argument("--test-examples", type=int, default=160,
                   help="after training, response perplexity of the base alone and with the adapter on this many "
                        "held-out test examples, stratified, on which the gate snapshots are also taken; 0 skips "
                        "both (default: 160)")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"save a resumable checkpoint every N steps, beside --out (default: {d.checkpoint_every})")
    t.add_argument("--mixed-precision", default="no",
                   help=f"{', '.join(MIXED_PRECISION)} (default: no; auto: bf16 where the device computes it natively; "
                   "with --federated, no, bf16 or auto, decided on each client)")
    t.add_argument("--seed", type=int, default=0, help="seed for splits, initialisation and batch order (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--force", action="store_true", help="replace an adapter folder that already holds files")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def checkpoint_dir_for(out) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.checkpoint"


def main(argv=None) -> None:
    from mops.federated import cli as federated

    parser = build_parser()
    federated.add_arguments(parser)  # --federated N and its options; the run lives in mops/federated
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    if args.federated is not None:
        return federated.run_from_args(args)
    federated.refuse_without_federated(args, parser)
    mixture = MixtureConfig(args.experts, args.prompt_len, args.gate, args.combine, args.gate_layer,
                            args.inject_layer, args.gate_hidden, args.temperature, args.top_k, args.router_noise,
                            args.shared_len)
    config = TrainConfig(args.steps, args.batch_size, args.grad_accum, args.lr, args.gate_lr, args.gate_pretrain_steps,
                         args.gate_pretrain_lr, args.gate_pretrain_examples, max_len=args.max_len, eval_every=args.eval_every,
                         eval_examples=args.eval_examples, checkpoint_every=args.checkpoint_every, seed=args.seed,
                         mixed_precision=args.mixed_precision, warm_steps=args.warm_steps, balance=args.balance,
                         lora_lr=args.lora_lr, lr_schedule=args.lr_schedule, lr_warmup=args.lr_warmup,
                         distill=args.distill)
    config.validate()
    require_teacher(config.distill, bool(args.teacher))
    if args.teacher and not config.distill:
        raise UserError("--teacher: given without --distill, it would not be used; pass --distill (e.g. 0.5)")
    if args.limit_per_source is not None and args.limit_per_source < 1:
        raise UserError(f"--limit-per-source {args.limit_per_source}: expected a positive whole number")
    if args.test_examples < 0:
        raise UserError(f"--test-examples {args.test_examples}: expected 0 or more")
    check_output_dir(args.out, args.force)
    if checkpoint_dir_for(args.out).exists() and not (args.resume or args.force):
        raise UserError(f"an interrupted run left a checkpoint at {checkpoint_dir_for(args.out)}; "
                        "pass --resume to continue it, or --force to start over")
    records = load_records(args.data, args.limit_per_source, args.seed)
    model, tokenizer = load_model(args.base, device=args.device)
    resolved = mixture.resolved(model.config.num_hidden_layers)  # bad layers or sizes fail before any work
    base_hash = weights_hash(model)
    sources = [read_source_prompt(d, base_hash, resolved, model.config.hidden_size) for d in args.source_prompt]
    teacher = TeacherTargets(load_model(args.teacher, device=args.device)[0]) if args.teacher else None
    splits = split_records(records, args.seed)
    test = stratified_subset(splits["test"], args.test_examples, args.seed) if args.test_examples else []
    lm, history = recover(model, tokenizer, splits, mixture, config, checkpoint_dir=checkpoint_dir_for(args.out),
                          resume=args.resume, progress=not args.quiet, device=args.device, source_prompts=sources,
                          snapshot_records=test, teacher=teacher)
    if test:
        history["test"] = {"examples": len(test), "max_len": RESPONSE_MAX_LEN,
                           "base": response_perplexity(model, tokenizer, test, progress=not args.quiet),
                           "adapter": response_perplexity(lm, tokenizer, test, progress=not args.quiet)}
    if weights_hash(model) != base_hash:  # cannot happen unless a bug trains the base; never ship that
        raise RuntimeError("the base model's weights changed during training")
    extra = {"data": args.data, "source_prompts": args.source_prompt, "limit_per_source": args.limit_per_source,
             "training": asdict(config), "teacher": args.teacher,
             "split_sizes": {k: len(v) for k, v in splits.items()}}
    out = save_adapter(lm, args.out, base_name=args.base, base_hash=base_hash, extra=extra, history=history,
                       force=args.force)
    shutil.rmtree(checkpoint_dir_for(args.out), ignore_errors=True)  # the adapter is complete; the checkpoint is spent
    print(summary(history, out))


def summary(history: dict, out) -> str:
    val = history["validation"]
    lines = [f"adapter -> {out}"]
    if val:
        lines.append(f"  validation response ppl: {val[0]['ppl']:.2f} at step {val[0]['step']} -> "
                     f"{val[-1]['ppl']:.2f} at step {val[-1]['step']}")
    if history["train_loss"]:
        lines.append(f"  train loss: {history['train_loss'][0]:.3f} -> {history['train_loss'][-1]:.3f}")
    if "test" in history:
        lines.append(held_out_line(history["test"]))
    return "\n".join(lines)


def entry(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(entry())
