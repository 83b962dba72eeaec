"""``recover(model, tokenizer, splits, mixture, train) -> PromptedLM``: train a Mixture of
Prompts on a frozen (pruned) model.

1. Experts start from real activations entering the injection layer (for l = 0,
   embeddings of random vocabulary tokens, as Lester et al.), so their scale matches the
   residual stream there.
2. Gate pretraining (experts frozen): a classifier from the pooled instruction states to
   the example's category, category c -> expert c mod K.
3. Joint training: response-only LM loss, AdamW with two learning rates (experts, gate),
   held constant or decayed to 0 along a cosine (``lr_schedule``), gradient accumulation,
   accelerate for device placement and mixed precision,
   validation perplexity every ``eval_every`` steps, and a checkpoint every
   ``checkpoint_every`` steps that ``resume=True`` continues from, exactly. Each
   micro-batch is packed into one sequence and the frozen layers below l run once per
   example (:mod:`mops.lower_cache`); the loss and gradients are the padded batch's.
   Options for routing: the gate held uniform for the first ``warm_steps`` (in
   ``attention`` mode that trains one K*m prompt, then splits it into K experts), a
   load-balancing term (``balance``, Switch Transformer's K * sum_k f_k P_k), SMoP's
   router noise (drawn from (seed, step), so a resumed run draws the same), and a gate
   kept as pretrained (``gate_lr = 0``).
4. Optionally, gate snapshots (:mod:`mops.gate_analysis`) on held-out examples before
   training, after gate pretraining, midway and at the end.

The same loop trains the ``lora`` baseline: ``extra_params`` (LoRA tensors inside the
base, :mod:`mops.lora`) train with ``lora_lr`` beside an empty mixture (m = 0, l = 0).

Batches are a pure function of (seed, step), so a resumed run sees the same batches as an
uninterrupted one and ends with the same adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mops.adapter import mixture_tensors
from mops.data import EncodedExample, InstructionRecord, encode_example, pad_batch, stratified_subset
from mops.distill import TeacherTargets, bucket_kl, require_teacher
from mops.errors import UserError
from mops.eval.perplexity import response_perplexity
from mops.gate_analysis import gate_snapshot
from mops.injection import PromptedLM
from mops.lower_cache import LowerStates, pooled_gate_inputs
from mops.mixture import Mixture, MixtureConfig
from mops.outputs import atomic_dir

log = logging.getLogger(__name__)
MIXED_PRECISION = ("no", "bf16", "fp16", "auto")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 0.3  # experts, ATTEMPT's target prompt, a shared prompt (chosen for prompts on validation)
    gate_lr: float = 3e-3  # the gate: slower, "two-speed" learning rates; 0 keeps it as pretrained
    gate_pretrain_steps: int = 50
    gate_pretrain_lr: float = 1e-2
    gate_pretrain_examples: int = 256
    max_len: int = 256
    eval_every: int = 50
    eval_examples: int = 64
    checkpoint_every: int = 50
    seed: int = 0
    mixed_precision: str = "no"
    warm_steps: int = 0  # steps with the gate held uniform before it routes
    balance: float = 0.0  # weight of the load-balancing term
    lora_lr: float = 2e-3  # LoRA's tensors (the lora baselines): a hundred times smaller than the prompts'
    lr_schedule: str = "constant"  # or "cosine": every group's rate from its lr down to 0 over the run's steps
    lr_warmup: int = 0  # steps over which every rate rises linearly to its value (then the schedule's)
    distill: float = 0.0  # weight a of KL(dense || recovered) in the loss, the NLL's 1 - a (mops.distill)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "max_len", "eval_every", "checkpoint_every",
                     "gate_pretrain_examples", "eval_examples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a positive whole number")
        if self.max_len < 2:
            raise UserError(f"--max-len {self.max_len}: expected at least 2 tokens (one of prompt, one of response)")
        for name in ("gate_pretrain_steps", "warm_steps", "lr_warmup"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected 0 or more")
        for name in ("lr", "gate_pretrain_lr", "lora_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a positive learning rate")
        if not 0 <= self.distill <= 1:
            raise UserError(f"--distill {self.distill}: expected a weight from 0 to 1")
        for name in ("gate_lr", "balance"):
            if not getattr(self, name) >= 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected 0 or more")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"--lr-schedule {self.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(f"--mixed-precision {self.mixed_precision!r}: expected one of {', '.join(MIXED_PRECISION)}")


# ----------------------------------------------------------------------------- pieces


def resolve_mixed_precision(value: str, device: torch.device) -> str:
    """``auto``: bf16 where the device multiplies bfloat16 natively (a CUDA GPU that supports
    it; a CPU with AVX512-BF16 or AMX: on one, the default step measured 1.9x faster alone in
    ``benchmarks/step_cost.py``, a whole training loop 1.2x), else no (elsewhere bfloat16 is
    emulated: not measured, so not chosen for anyone). The frozen layers below l stay in the
    base's precision anyway."""
    if value != "auto":
        return value
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return "bf16" if native else "no"


def autocast(precision: str, device: torch.device):
    """The training forward's autocast for a resolved precision: bfloat16 for ``bf16``,
    nothing for ``no``. (``recover`` uses accelerate's, which also scales fp16 losses; a
    federated client, which has no accelerator, uses this one and takes bf16 only.)"""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def category_targets(records: list[InstructionRecord], n_experts: int) -> list[int]:
    """Each record's expert: category c (in sorted order) -> expert c mod K."""
    index = {c: i % n_experts for i, c in enumerate(sorted({r.category for r in records}))}
    return [index[r.category] for r in records]


def collate(examples: list[EncodedExample], pad_id: int, device) -> dict:
    return {k: v.to(device) for k, v in pad_batch(examples, pad_id, side="right").items()}


@torch.no_grad()
def initial_experts(model, tokenizer, examples: list[EncodedExample], n_vectors: int, inject_layer: int,
                    seed: int) -> torch.Tensor:
    """``n_vectors`` x d starting points at the scale of the residual stream entering layer l."""
    gen = torch.Generator().manual_seed(seed)
    embed = model.model.embed_tokens.weight
    if inject_layer == 0:
        ids = torch.randint(0, embed.shape[0], (n_vectors,), generator=gen)
        return embed[ids.to(embed.device)].float().cpu()
    probe = PromptedLM(model, Mixture(MixtureConfig(1, 0, "uniform", gate_layer=0, inject_layer=inject_layer), embed.shape[1]))
    order = torch.randperm(len(examples), generator=gen).tolist()
    vectors = []
    for start in range(0, len(order), 8):
        batch = collate([examples[i] for i in order[start : start + 8]], tokenizer.pad_token_id, embed.device)
        hidden, _, _ = probe.lower(batch["input_ids"], batch["attention_mask"])
        vectors.append(hidden[batch["attention_mask"].bool()].float().cpu())
        if sum(len(v) for v in vectors) >= 4 * n_vectors:
            break
    pool = torch.cat(vectors)
    return pool[torch.randperm(len(pool), generator=gen)[:n_vectors]]


class BatchOrder:
    """Micro-batch ``j`` of step ``s``: a pure function of (seed, s, j), epoch by epoch."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int):
        self.n, self.bs, self.accum, self.seed = n, batch_size, grad_accum, seed
        self._epoch, self._perm = -1, []  # the permutation of the epoch last asked for

    def indices(self, step: int, micro: int) -> list[int]:
        start = (step * self.accum + micro) * self.bs
        out = []
        for pos in range(start, start + self.bs):
            epoch, offset = divmod(pos, self.n)
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, list(range(self.n))
                random.Random(f"{self.seed}/epoch{epoch}").shuffle(self._perm)
            out.append(self._perm[offset])
        return out


def pretrain_gate(lm: PromptedLM, examples: list[EncodedExample], targets: list[int], config: TrainConfig,
                  progress: bool, lower: LowerStates | None = None, pooled: torch.Tensor | None = None) -> list[float]:
    """Fit the gate as a classifier, category -> expert, with the experts frozen. ``pooled``
    (N x d gate inputs, one per target) replaces ``examples`` where only those are at hand
    (a federated server, given its clients' pooled inputs)."""
    gate = lm.mixture.gate
    pooled = pooled_gate_inputs(lm, examples, lower) if pooled is None else pooled.to(lm.mixture.experts.weight.device)
    y = torch.tensor(targets, device=pooled.device)
    experts = lm.mixture.experts().detach()
    opt = torch.optim.AdamW(gate.parameters(), lr=config.gate_pretrain_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in tqdm(range(config.gate_pretrain_steps), desc="gate pretraining", disable=not progress, leave=False):
        idx = torch.randint(0, len(y), (min(64, len(y)),), generator=gen).to(y.device)
        weights = gate.from_pooled(pooled[idx], experts)
        loss = torch.nn.functional.nll_loss(torch.log(weights.clamp_min(1e-12)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def build_mixture(model, tokenizer, train_examples, mixture: MixtureConfig, seed: int,
                  initialise: bool = True, empty_ok: bool = False) -> PromptedLM:
    """The mixture on ``model``; ``initialise=False`` skips the activation pass (a resume
    overwrites the experts anyway); ``empty_ok`` allows m = 0 (when LoRA is what trains)."""
    c = mixture.resolved(model.config.num_hidden_layers)
    if c.prompt_len < 1 and not empty_ok:
        raise UserError(f"--prompt-len {c.prompt_len}: nothing to train; expected at least 1 vector per expert")
    init = shared = None
    if initialise:
        vectors = initial_experts(model, tokenizer, train_examples, c.init_vectors, c.inject_layer, seed)
        n = c.n_prompts * c.prompt_len
        init, shared = vectors[:n].reshape(c.n_prompts, c.prompt_len, model.config.hidden_size), vectors[n:]
    torch.manual_seed(seed)  # the gate's own initialisation
    device = next(model.parameters()).device
    return PromptedLM(model, Mixture(c, model.config.hidden_size, init=init, shared_init=shared).to(device))


def trainable_groups(lm: PromptedLM, config: TrainConfig, extra_params=()) -> list[dict]:
    # gate_lr 0 keeps the gate as pretrained (it leaves the optimizer altogether)
    gate = [p for p in lm.mixture.gate.parameters() if p.requires_grad] if config.gate_lr > 0 else []
    prompts = [p for n, p in lm.mixture.named_parameters() if not n.startswith("gate.")]
    groups = [{"params": prompts, "lr": config.lr, "name": "experts"}]
    if extra_params:
        groups.append({"params": list(extra_params), "lr": config.lora_lr, "name": "lora"})
    if gate:
        groups.append({"params": gate, "lr": config.gate_lr, "name": "gate"})
    for group in groups:
        group["base_lr"] = group["lr"]  # what the schedule scales
    return groups


def schedule_lr(optimizer, config: TrainConfig, step: int, total_steps: int) -> None:
    """Set every group's rate for optimizer step ``step`` (0-based) of ``total_steps``.

    A pure function of the step, so a resumed run (or a federated client, which builds a
    new optimizer every round) follows the same curve as an uninterrupted one."""
    factor = 1.0
    if config.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    if step < config.lr_warmup:  # step 0 already moves, at 1/N of the rate
        factor *= (step + 1) / config.lr_warmup
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# ----------------------------------------------------------------------------- checkpoints

CKPT_STATE = "trainer_state.json"


def save_checkpoint(folder: Path, lm: PromptedLM, optimizer, step: int, history: dict, settings: dict,
                    extra_params=()) -> None:
    """Atomically replace ``folder`` with the state after ``step`` optimizer steps."""
    with atomic_dir(folder, force=True) as tmp:
        save_file(mixture_tensors(lm.mixture), tmp / "mixture.safetensors")
        if extra_params:
            save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(extra_params)}, tmp / "extra.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / CKPT_STATE).write_text(json.dumps({"step": step, "history": history, "settings": settings}))


def load_checkpoint(folder: Path, lm: PromptedLM, optimizer, settings: dict, extra_params=()) -> tuple[int, dict]:
    """Restore a checkpoint made with the same settings (anything else would not resume exactly)."""
    state = json.loads((folder / CKPT_STATE).read_text())
    saved = state.get("settings", {})
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
        raise UserError(f"--resume: the checkpoint at {folder} was made with other {', '.join(changed)}; "
                        "rerun with the original options, or start over with --force")
    lm.mixture.load_state_dict(load_file(folder / "mixture.safetensors"))
    if extra_params:
        saved_extra = load_file(folder / "extra.safetensors")
        with torch.no_grad():
            for i, p in enumerate(extra_params):
                p.copy_(saved_extra[str(i)])
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return state["step"], state["history"]


def run_fingerprint(c: MixtureConfig, config: TrainConfig, train_records: list[InstructionRecord],
                    extra_params=()) -> dict:
    """What fixes a run's trajectory: a checkpoint resumes only under the same values."""
    digest = hashlib.sha256(json.dumps([r.to_dict() for r in train_records]).encode()).hexdigest()
    bookkeeping = {"eval_every", "eval_examples", "checkpoint_every"}
    if config.lr_schedule == "constant":
        bookkeeping.add("steps")  # a constant rate lets a resumed run go on for longer; a schedule does not
    return {"mixture": asdict(c), "training": {k: v for k, v in asdict(config).items() if k not in bookkeeping},
            "train_data_sha256": digest, "extra_params": [list(p.shape) for p in extra_params]}


# ----------------------------------------------------------------------------- the loop


def recover(model, tokenizer, splits: dict[str, list[InstructionRecord]], mixture: MixtureConfig,
            config: TrainConfig, checkpoint_dir=None, resume: bool = False, progress: bool = True,
            on_step: Callable[[int, dict], None] | None = None, device: str | None = None,
            source_prompts: list[torch.Tensor] = (), snapshot_records: list[InstructionRecord] = (),
            extra_params=(), lower: LowerStates | None = None,
            teacher: TeacherTargets | None = None) -> tuple[PromptedLM, dict]:
    """Train a mixture on ``splits['train']``; return the prompted model and the history.

    ``source_prompts`` (m x d each, e.g. from :func:`mops.adapter.read_source_prompt`)
    become experts 0, 1, ... and stay frozen: a mixture composed of prompts trained
    earlier on other tasks or sources, with the remaining experts and the gate trained.
    ``snapshot_records`` (held-out) get the gate's average weights per category into
    ``history["gate_snapshots"]`` before training, after gate pretraining, midway and at
    the end. ``extra_params`` are tensors inside the base (LoRA) that train too.
    ``lower`` keeps the frozen lower layers' states; pass one to share it between runs on
    the same base (the recovery study does, across methods). ``teacher`` holds the dense
    model's targets, which ``config.distill`` > 0 trains toward (share one between runs too).
    """
    from accelerate import Accelerator

    config.validate()
    require_teacher(config.distill, teacher is not None)
    teacher = teacher if config.distill else None  # a study's shared teacher, for the runs that distill
    if teacher:
        teacher.check_vocabulary(model)
    train_records = splits["train"]
    if not train_records:
        raise UserError("no training records")
    from accelerate.state import AcceleratorState

    device = torch.device(device or model.device)
    precision = resolve_mixed_precision(config.mixed_precision, device)
    if AcceleratorState._shared_state.get("_mixed_precision") not in (None, precision):
        # accelerate keeps one state per process and refuses a second precision; a study trains
        # runs of several precisions one after another in one process, so the last run's goes
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    model.to(accelerator.device)
    train = [encode_example(tokenizer, r, config.max_len) for r in train_records]
    val = stratified_subset(splits.get("validation", []), config.eval_examples, config.seed)
    extra_params = list(extra_params)
    # tensors that train inside the base (LoRA) would make stored lower states stale
    lower = None if extra_params else (lower or LowerStates())

    def evaluate(prompted):
        return response_perplexity(prompted, tokenizer, val, config.max_len, progress=False, lower=lower)

    lm = build_mixture(model, tokenizer, train, mixture, config.seed, initialise=not resume, empty_ok=bool(extra_params))
    c = lm.mixture.config
    if extra_params and c.inject_layer != 0:
        # layers below l run without gradients (nothing there depends on a prompt)
        raise ValueError("tensors inside the base train only with inject_layer 0")
    for p in extra_params:
        p.requires_grad_(True)  # PromptedLM froze the whole base, LoRA included
    settings = run_fingerprint(c, config, train_records, extra_params)
    if len(source_prompts) > c.n_experts:
        raise UserError(f"{len(source_prompts)} source prompts for {c.n_experts} experts; raise --experts")
    for i, prompt in enumerate(source_prompts):
        lm.mixture.experts.freeze(i, prompt)
    wants_pretraining = lm.mixture.needs_gate_states and config.gate_pretrain_steps > 0
    if wants_pretraining:
        categories = {r.category for r in train_records}
        if len(categories) < 2:
            raise UserError(f"gate pretraining needs records of at least 2 categories, found {sorted(categories)}; "
                            "map a category field (path.jsonl#...,category=FIELD) or pass --gate-pretrain-steps 0")
    optimizer = torch.optim.AdamW(trainable_groups(lm, config, extra_params), weight_decay=0.0)
    history = {"train_loss": [], "validation": [], "gate_pretrain_loss": []}
    step = 0
    # only a gate has weights worth a snapshot; uniform and single mixtures skip the encoding too
    records = snapshot_records if lm.mixture.needs_gate_states else []
    snapshot_examples = [encode_example(tokenizer, r, config.max_len) for r in records]
    # the gate's input comes from the frozen layers below g: pool it once, not once per snapshot
    snapshot_pooled = pooled_gate_inputs(lm, snapshot_examples, lower) if snapshot_examples else None

    def snapshot(label: str, at: int) -> None:
        if snapshot_examples:
            mixture = accelerator.unwrap_model(lm).mixture
            with torch.no_grad():
                weights = mixture.weights_from_pooled(snapshot_pooled, len(snapshot_examples)).float().cpu()
            history.setdefault("gate_snapshots", []).append(gate_snapshot(snapshot_examples, weights, label, at))

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    if resume:
        if not checkpoint_dir or not (checkpoint_dir / CKPT_STATE).is_file():
            raise UserError(f"--resume: no checkpoint at {checkpoint_dir}; start without --resume")
        step, history = load_checkpoint(checkpoint_dir, lm, optimizer, settings, extra_params)
        log.info("resumed from step %d of %d", step, config.steps)
    else:
        snapshot("before training", 0)
        if wants_pretraining:
            subset = stratified_subset(train_records, config.gate_pretrain_examples, config.seed)
            targets = category_targets(subset, c.n_experts)
            sub_examples = [encode_example(tokenizer, r, config.max_len) for r in subset]
            history["gate_pretrain_loss"] = pretrain_gate(lm, sub_examples, targets, config, progress, lower)
            snapshot("after gate pretraining", 0)
        if val:
            history["validation"].append({"step": 0, **evaluate(lm)})
        if checkpoint_dir:
            save_checkpoint(checkpoint_dir, lm, optimizer, 0, history, settings, extra_params)

    history["mixed_precision"] = precision  # this run's; under auto a resumed run's may differ from the killed one's
    lm, optimizer = accelerator.prepare(lm, optimizer)
    # without accelerate's autocast wrapper on forward: the model returned scores and generates in
    # the base's precision; training autocasts explicitly below
    inner = accelerator.unwrap_model(lm, keep_fp32_wrapper=False)
    order = BatchOrder(len(train), config.batch_size, config.grad_accum, config.seed)
    bar = tqdm(total=config.steps, initial=step, desc="mops-recover", disable=not progress)
    started = time.perf_counter()
    while step < config.steps:
        optimizer.zero_grad()
        loss_sum, usage = 0.0, []
        for micro in range(config.grad_accum):
            examples = [train[i] for i in order.indices(step, micro)]
            targets = teacher.get(examples, device, precision) if teacher else None
            with accelerator.autocast():
                out = training_loss(inner, examples, config, step, micro, lower, targets)
            accelerator.backward(out.loss / config.grad_accum)
            loss_sum += out.lm_loss / config.grad_accum
            usage.append(out.usage)
        schedule_lr(optimizer, config, step, config.steps)
        optimizer.step()
        step += 1
        history["train_loss"].append(loss_sum)
        history.setdefault("lr", []).append(optimizer.param_groups[0]["lr"])  # the experts' (or LoRA's) rate
        history.setdefault("expert_usage", []).append([sum(u) / len(usage) for u in zip(*usage)])
        postfix = {"loss": f"{loss_sum:.3f}"}
        if val and (step % config.eval_every == 0 or step == config.steps):
            history["validation"].append({"step": step, **evaluate(inner)})
        if history["validation"]:
            postfix["val_ppl"] = f"{history['validation'][-1]['ppl']:.2f}"
        bar.set_postfix(postfix)
        bar.update(1)
        if step == config.steps:
            snapshot("end of training", step)
        elif step == config.steps // 2:
            snapshot("midway", step)
        if checkpoint_dir and (step % config.checkpoint_every == 0 or step == config.steps):
            save_checkpoint(checkpoint_dir, inner, optimizer, step, history, settings, extra_params)
        if on_step:
            on_step(step, history)
    bar.close()
    history["train_seconds_this_run"] = time.perf_counter() - started
    return inner.eval(), history


@dataclass
class StepLoss:
    loss: torch.Tensor  # what is minimised: the LM loss (mixed with distillation's) plus the balance term
    lm_loss: float  # the response NLL alone, as history["train_loss"] records it
    usage: list[float]  # the batch's mean routed weight on each expert


def training_loss(lm: PromptedLM, examples: list[EncodedExample], config: TrainConfig, step: int, micro: int,
                  lower: LowerStates | None, targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepLoss:
    """One micro-batch's loss, with the routing options of ``config`` and the mixture;
    ``targets``: the teacher's (:meth:`mops.distill.TeacherTargets.get`) when it distills."""
    mixture = lm.mixture
    K, B = mixture.config.n_experts, len(examples)
    device = mixture.experts.weight.device
    uniform = torch.full((B, K), 1.0 / K, device=device) if step < config.warm_steps else None
    noise = None
    if mixture.config.router_noise and uniform is None:  # drawn from (seed, step), so a resume draws the same
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1_009 + micro)
        noise = torch.randn(B, K, generator=gen).to(device)
    out = lm.forward_examples(examples, lower=lower, gate_weights=uniform, gate_noise=noise,
                              keep_logits=targets is not None)
    loss = out.loss
    if targets is not None:
        loss = (1 - config.distill) * loss + config.distill * bucket_kl(out.logits, *targets)
    if config.balance and out.gate_probs is not None:
        loss = loss + config.balance * balance_term(out.gate_probs, out.gate_weights)
    return StepLoss(loss, out.loss.item(), out.gate_weights.detach().float().mean(0).tolist())


def balance_term(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss, K * sum_k f_k * P_k: f_k the share of inputs
    whose largest weight is expert k, P_k the mean gate probability of k. 1 when balanced."""
    K = probs.shape[1]
    share = torch.nn.functional.one_hot(weights.argmax(1), K).float().mean(0)
    return K * (share * probs.mean(0)).sum()
