"""Perplexity, measured as the pruning papers and the recovery study need it.

- :func:`wikitext_perplexity`: the SparseGPT / Wanda protocol. WikiText-2 raw test rows
  joined with "\\n\\n", tokenized once, cut into non-overlapping windows of ``seq_len``
  tokens, token-level mean NLL over all windows. On a CPU, ``max_windows`` keeps only the
  first W windows; the result always states W.
- :func:`response_perplexity`: instruction data, loss on response tokens only, overall
  and per category (token-weighted).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mops.data import encode_example, heldout_records, pad_batch, wikitext_text
from mops.errors import UserError
from mops.injection import PromptedLM


#: Tokens per example in held-out response perplexity: every table in the toolkit uses it.
RESPONSE_MAX_LEN = 512


def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor):
    """Per-token NLL (float32) of ``labels`` shifted by one; zero where labels are -100."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    return nll * (target != -100)


@torch.no_grad()
def wikitext_perplexity(model, tokenizer, seq_len: int = 2048, max_windows: int | None = None,
                        split: str = "test", progress: bool = True) -> dict:
    ids = tokenizer(wikitext_text(split), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise UserError(f"seq_len {seq_len}: longer than the {ids.numel()} tokens of WikiText-2 {split}")
    used = n_windows if max_windows is None else min(max_windows, n_windows)
    device = next(model.parameters()).device
    per_window = []  # each window's summed NLL: the windows can be resampled for an interval
    for w in tqdm(range(used), desc="wikitext2 ppl", disable=not progress, leave=False):
        window = ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0).to(device)
        per_window.append(token_nll(model, window, None, window).sum().item())
    count = used * (seq_len - 1)
    return {
        "ppl": math.exp(sum(per_window) / count),
        "protocol": f"WikiText-2 raw {split}, rows joined by \\n\\n, non-overlapping {seq_len}-token windows, "
        f"first {used} of {n_windows} windows, token-level mean NLL",
        "seq_len": seq_len,
        "windows": used,
        "windows_total": n_windows,
        "tokens": count,
        "per_window": per_window,
    }


@torch.no_grad()
def response_perplexity(model, tokenizer, records, max_len: int = RESPONSE_MAX_LEN, batch_size: int = 8,
                        progress: bool = True, lower=None, pack_tokens: int = 1024) -> dict:
    """Perplexity of the responses given their prompts; overall, per category, and per example.

    ``model`` is a prompted model (``mops.injection.PromptedLM``, whose gate then sees the
    instruction tokens only) or a Llama-family causal LM, scored through a bare
    ``PromptedLM`` (the same logits; the head only on response tokens). Examples are packed
    up to ``pack_tokens`` tokens; ``lower`` (a :class:`mops.lower_cache.LowerStates`)
    supplies the frozen lower layers when given. Other causal LMs run in padded batches of
    ``batch_size``. ``per_example`` holds each record's summed NLL and response tokens, in
    the order of ``records``, for paired bootstraps.
    """
    if not records:
        raise UserError("response perplexity needs at least one record")
    if not isinstance(model, PromptedLM) and _llama_family(model):
        model = PromptedLM.bare(model)
    examples = [encode_example(tokenizer, r, max_len) for r in records]
    # Similar lengths together: less padding (or smaller packs), fewer wasted FLOPs on a CPU.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    nll, tokens = [0.0] * len(examples), [0] * len(examples)
    for batch in tqdm(list(_batches(order, examples, model, batch_size, pack_tokens)), desc="response ppl",
                      disable=not progress, leave=False):
        row_nll, row_tokens = _response_nll(model, [examples[i] for i in batch], tokenizer.pad_token_id, lower)
        for i, s, n in zip(batch, row_nll.tolist(), row_tokens.tolist()):
            nll[i], tokens[i] = s, n
    sums, counts = defaultdict(float), defaultdict(int)
    for e, s, n in zip(examples, nll, tokens):
        sums[e.category] += s
        counts[e.category] += n
    total, count = sum(nll), sum(tokens)
    return {
        "ppl": math.exp(total / count),
        "per_category": {c: math.exp(sums[c] / counts[c]) for c in sorted(sums)},
        "examples": len(records),
        "tokens": count,
        "max_len": max_len,
        "per_example": {"nll": nll, "tokens": tokens},
    }


#: Held-out examples :func:`rescore_drift` scores, and the drift beyond which a model is not the
#: one scored before. The same weights on another CPU drift by about 1e-5 (float order); the
#: embedded model pruned to 2:4 again on another machine by 3% on these 8 examples.
DRIFT_EXAMPLES, DRIFT_TOLERANCE = 8, 1e-3


def rescore_drift(model, tokenizer, records, per_example: dict, examples: int = DRIFT_EXAMPLES) -> float:
    """How far ``model`` now scores the first ``examples`` of ``records`` from ``per_example``
    (a :func:`response_perplexity` of the same records, saved earlier): ppl_now / ppl_then - 1
    over those examples. A results file checks with it that a checkpoint made again (a pruned
    model re-pruned on another machine) is still the model its cells were made on."""
    now = response_perplexity(model, tokenizer, records[:examples], progress=False)["per_example"]
    then = {k: v[:examples] for k, v in per_example.items()}
    if now["tokens"] != then["tokens"]:
        return math.inf  # other examples or another tokenizer: nothing to compare
    return math.exp((sum(now["nll"]) - sum(then["nll"])) / sum(now["tokens"])) - 1


def require_same_model(model, tokenizer, records, per_example: dict, checkpoint, results_file) -> None:
    """Refuse (one line) to add cells made on ``checkpoint`` to ``results_file`` when it is not
    the model the file's saved score ``per_example`` was made with: pairing the two would
    compare methods across different pruned models."""
    drift = rescore_drift(model, tokenizer, records, per_example)
    if not abs(drift) <= DRIFT_TOLERANCE:
        raise UserError(f"{checkpoint} scores {DRIFT_EXAMPLES} held-out examples {drift:+.2%} away from the model "
                        f"{results_file}'s cells were made on (pruned again, on another machine or library build?); "
                        "use --name for a new study, or bring back that checkpoint")


def _llama_family(model) -> bool:
    inner = getattr(model, "model", None)
    return all(hasattr(inner, part) for part in ("layers", "embed_tokens", "norm", "rotary_emb")) and \
        hasattr(model, "lm_head") and getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def _batches(order, examples, model, batch_size: int, pack_tokens: int):
    if not isinstance(model, PromptedLM):
        yield from (order[s : s + batch_size] for s in range(0, len(order), batch_size))
        return
    batch, size = [], 0
    for i in order:
        n = len(examples[i].input_ids)
        if batch and size + n > pack_tokens:
            yield batch
            batch, size = [], 0
        batch.append(i)
        size += n
    if batch:
        yield batch


def _response_nll(model, batch: list, pad_id: int, lower):
    """Summed response NLL and response token count of each example."""
    if isinstance(model, PromptedLM):
        out = model.forward_examples(batch, lower=lower)
        return out.row_nll, out.row_tokens
    device = next(model.parameters()).device
    t = {k: v.to(device) for k, v in pad_batch(batch, pad_id).items()}
    nll = token_nll(model, t["input_ids"], t["attention_mask"], t["labels"])
    return nll.sum(1), (t["labels"][:, 1:] != -100).sum(1)


def perplexity_suite(model, tokenizer, seq_len: int = 2048, max_windows: int | None = None,
                     data: str = "dolly+natural-instructions", max_examples: int | None = None,
                     seed: int = 0, progress: bool = True) -> dict:
    """The two numbers every table here shows: WikiText-2 and held-out response perplexity."""
    wiki = wikitext_perplexity(model, tokenizer, seq_len, max_windows, progress=progress)
    test = heldout_records(data, "test", max_examples, seed)
    resp = response_perplexity(model, tokenizer, test, progress=progress)
    return {"wikitext2": wiki, "response": {**resp, "data": data, "split": "test"}}
