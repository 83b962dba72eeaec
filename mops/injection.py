"""A frozen Llama-family causal LM steered by a Mixture of Prompts, without forking it.

The forward pass, in the model's own modules:

1. embed the input; run decoder layers ``[0, max(g, l))`` on the input alone (no
   gradient: nothing below the injection layer depends on a trainable tensor);
2. the gate reads the hidden states entering layer ``g``, pooled over instruction tokens;
3. the mixture's prompt is prepended to the hidden states entering layer ``l``; the
   prompt takes positions 0..M-1 and the input tokens follow (PEFT's convention); every
   input token sees every prompt position (plus, in ``attention`` mode, log(K w_k) on its
   logits toward expert k); prompt positions see only earlier prompt positions;
4. layers ``[l, L)`` run on ``[prompt; input]``; prompt positions are dropped before the
   final norm and the head, and the head runs only where logits are needed.

Attention masks are built here as 4-D tensors (boolean, or additive when there is a
bias), which the model's ``eager`` and ``sdpa`` attention both accept.

Training and scoring use :meth:`PromptedLM.forward_examples`, the same computation on
examples *packed* into one sequence instead of a padded batch: no position is spent on
padding (a third of a padded training batch here), a prompt shared by every input runs
once per batch instead of once per row, and the states entering layer l can come from
:class:`mops.lower_cache.LowerStates`, which runs the frozen layers below l once per
example. Block masks keep every example blind to the others, so the loss and its
gradients are those of the padded forward (tests/test_packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mops.data import EncodedExample
from mops.errors import UserError
from mops.lower_cache import pool_gate_states
from mops.mixture import Mixture, MixtureConfig
from mops.packing import Packing, packed

SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclass
class PromptedOutput:
    logits: torch.Tensor | None  # B x T x V over the input positions (None when only the loss was asked;
    # forward_examples: N x V at the response positions, when asked)
    loss: torch.Tensor | None  # mean response-token NLL
    gate_weights: torch.Tensor  # B x K (after top-k routing)
    row_nll: torch.Tensor | None = None  # B: summed response NLL of each row, for exact perplexities
    row_tokens: torch.Tensor | None = None  # B: response tokens of each row
    gate_probs: torch.Tensor | None = None  # B x K soft gate weights, before top-k (for load balancing)


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Losses in float32 from half-precision logits; float64 ones stay float64."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _as_mask(allowed: torch.Tensor, additive: bool, dtype: torch.dtype) -> torch.Tensor:
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def input_rows_mask(keys: torch.Tensor, n_prefix: int, q_len: int, bias: torch.Tensor | None,
                    additive: bool, dtype: torch.dtype) -> torch.Tensor:
    """B x 1 x Q x (P + S) mask for the queries of the last ``q_len`` of ``S`` input positions.

    ``keys`` (B x S, bool) marks real input tokens; the first ``n_prefix`` key positions are
    the prompt, visible to every input query (with ``bias`` added, if any). Each query also
    sees itself, so a padding row is never fully masked (no NaN leaks through padding).
    """
    B, S = keys.shape
    q_pos = torch.arange(S - q_len, S, device=keys.device)
    k_pos = torch.arange(S, device=keys.device)
    allowed = ((k_pos[None, :] <= q_pos[:, None])[None] & keys[:, None, :]) | (k_pos[None, :] == q_pos[:, None])[None]
    allowed = torch.cat([allowed.new_ones(B, q_len, n_prefix), allowed], dim=2)[:, None]
    mask = _as_mask(allowed, additive, dtype)
    if bias is not None:
        mask[..., :n_prefix] += bias[:, None, None, :].to(dtype)
    return mask


def prompt_rows_mask(n_prefix: int, keys: torch.Tensor, additive: bool, dtype: torch.dtype) -> torch.Tensor:
    """B x 1 x P x (P + S) mask for the prompt queries: causal among the prompt, blind to the input."""
    B, S = keys.shape
    allowed = torch.zeros(n_prefix, n_prefix + S, dtype=torch.bool, device=keys.device)
    allowed[:, :n_prefix] = torch.ones(n_prefix, n_prefix, dtype=torch.bool, device=keys.device).tril()
    return _as_mask(allowed.expand(B, 1, n_prefix, n_prefix + S), additive, dtype)


class PromptedLM(nn.Module):
    """``base`` (frozen, untouched) + ``mixture`` injected at ``inject_layer``."""

    def __init__(self, base, mixture: Mixture, freeze: bool = True):
        super().__init__()
        impl = getattr(base.config, "_attn_implementation", "sdpa") or "sdpa"
        if impl not in SUPPORTED_ATTENTION:
            raise UserError(f"attention implementation {impl!r}: prompts need one of {', '.join(SUPPORTED_ATTENTION)}")
        self.base = base
        self.mixture = mixture
        if freeze:
            for p in base.parameters():
                p.requires_grad_(False)
        c = mixture.config
        self.gate_layer, self.inject_layer = c.gate_layer, c.inject_layer

    @classmethod
    def bare(cls, base) -> "PromptedLM":
        """``base`` as it is, with no prompt (its logits are the base's, bitwise), in the
        packed path; the base's parameters are left as they are."""
        config = MixtureConfig(1, 0, "uniform", gate_layer=0, inject_layer=0).resolved(base.config.num_hidden_layers)
        return cls(base, Mixture(config, base.config.hidden_size).to(base.device), freeze=False)

    # ------------------------------------------------------------------ pieces
    @property
    def layers(self):
        return self.base.model.layers

    def _run(self, hidden, layers, mask, positions, cache=None, **attention):
        rope = self.base.model.rotary_emb(hidden, position_ids=positions)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=cache is not None, position_embeddings=rope, **attention)
        return hidden

    def _run_packed(self, hidden, layers, pack: Packing, bias=None):
        """``layers`` on a packed 1 x N sequence, attending block by block (:mod:`mops.packing`)."""
        masks = pack.masks(bias, hidden.dtype, hidden.device)
        with packed(self.base.config):
            return self._run(hidden, layers, None, pack.positions[None], packing=pack, block_masks=masks)

    def _additive(self, bias) -> bool:
        return bias is not None or self.base.config._attn_implementation == "eager"

    def lower(self, input_ids, attention_mask, cache=None):
        """Layers below the injection layer on the input alone; and the gate's states."""
        keys = attention_mask.bool()
        positions = (keys.long().cumsum(1) - 1).clamp_min(0)
        dtype = self.base.model.embed_tokens.weight.dtype
        hidden = self.base.model.embed_tokens(input_ids)
        mask = input_rows_mask(keys, 0, keys.shape[1], None, self._additive(None), dtype)
        gate_states = hidden if self.gate_layer == 0 else None
        top = max(self.gate_layer, self.inject_layer) if self.mixture.needs_gate_states else self.inject_layer
        rope = self.base.model.rotary_emb(hidden, position_ids=positions)
        at_inject = hidden
        for i in range(top):
            # Layers past the injection layer run here only to feed the gate: no cache.
            hidden = self.layers[i](hidden, attention_mask=mask, position_ids=positions,
                                    past_key_values=cache if i < self.inject_layer else None,
                                    use_cache=cache is not None and i < self.inject_layer, position_embeddings=rope)
            if i + 1 == self.inject_layer:
                at_inject = hidden
            if i + 1 == self.gate_layer:
                gate_states = hidden
        return at_inject, gate_states, positions

    def upper(self, hidden, keys, positions, prompt, bias, cache=None, prompt_kv=None):
        """Prepend the prompt at the injection layer and run the remaining layers.

        With ``prompt_kv`` (:meth:`shared_prompt_kv`, a prompt every input shares) the
        prompt's keys and values go into ``cache`` as they are and only the input runs."""
        B, M = hidden.shape[0], prompt.shape[1]
        dtype = hidden.dtype
        additive = self._additive(bias)
        if prompt_kv is not None:
            for i, (k, v) in enumerate(prompt_kv, start=self.inject_layer):
                cache.update(k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous(), i)
            mask = input_rows_mask(keys, M, keys.shape[1], bias, additive, dtype)
            return self._run(hidden, self.layers[self.inject_layer :], mask, positions + M, cache)
        mask = torch.cat([prompt_rows_mask(M, keys, additive, dtype),
                          input_rows_mask(keys, M, keys.shape[1], bias, additive, dtype)], dim=2)
        hidden = torch.cat([prompt.to(dtype).expand(B, -1, -1), hidden], dim=1)
        prompt_positions = torch.arange(M, device=hidden.device).expand(B, M)
        positions = torch.cat([prompt_positions, positions + M], dim=1)
        hidden = self._run(hidden, self.layers[self.inject_layer :], mask, positions, cache)
        return hidden[:, M:]

    @torch.no_grad()
    def shared_prompt_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The keys and values (1 x kv_heads x M x head_dim per layer in [l, L)) of a prompt
        every input shares, or None when the prompt depends on the input or is empty.

        Prompt positions attend only to earlier prompt positions, so in ``attention`` mode
        (or with a uniform gate) their keys and values are the same for every request: a
        server computes them once, and a request's prefill runs only its own tokens above l.
        """
        if not self.mixture.prompt_is_shared or not self.mixture.prompt_positions:
            return None
        from transformers import DynamicCache

        K = self.mixture.config.n_experts
        prompt, _ = self.mixture(torch.full((1, K), 1.0 / K, device=self.base.device))
        M = prompt.shape[1]
        cache = DynamicCache(config=self.base.config)
        dtype = self.base.model.embed_tokens.weight.dtype
        mask = prompt_rows_mask(M, torch.ones(1, 0, dtype=torch.bool, device=prompt.device), self._additive(None), dtype)
        self._run(prompt.to(dtype), self.layers[self.inject_layer :], mask, torch.arange(M, device=prompt.device)[None],
                  cache)
        return [(layer.keys, layer.values) for layer in cache.layers[self.inject_layer :]]

    def mix(self, gate_states, gate_mask, batch: int, gate_weights=None):
        weights = gate_weights if gate_weights is not None else self.mixture.gate_weights(gate_states, gate_mask, batch)
        prompt, bias = self.mixture(weights)
        return weights, prompt, bias

    # ------------------------------------------------------------------ packed
    @torch.no_grad()
    def lower_states(self, sequences: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each token sequence's states entering layer l and entering layer g (None without a
        gate), from the frozen layers below (no prompt there). One sequence at a time, so an
        example's states never depend on which others were computed with it: a run that
        takes them from a store and one that computes them agree bitwise. They run in the
        base's own precision even under ``--mixed-precision`` autocast, so a store shared
        across runs holds the same states whichever run filled it."""
        device = self.base.model.embed_tokens.weight.device
        with torch.autocast(device.type, enabled=False):
            return [self._lower_states_one(tokens, device) for tokens in sequences]

    def _lower_states_one(self, tokens: list[int], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        needs_gate = self.mixture.needs_gate_states
        hidden = self.base.model.embed_tokens(torch.tensor([tokens], device=device))
        at, done = {0: hidden}, 0
        pack = Packing.build([len(tokens)], 0, shared=True, device=device)
        for stop in sorted({self.inject_layer, self.gate_layer if needs_gate else 0}):
            if stop > done:
                hidden = at[stop] = self._run_packed(hidden, self.layers[done:stop], pack)
                done = stop
        inject = at[self.inject_layer][0]
        gate = None if not needs_gate else inject if self.gate_layer == self.inject_layer else at[self.gate_layer][0]
        return inject, gate

    def forward_examples(self, examples: list[EncodedExample], lower=None, gate_weights=None,
                         gate_noise=None, keep_logits: bool = False) -> PromptedOutput:
        """The response loss of ``examples`` packed into one sequence (see the module doc).

        ``lower`` (a :class:`mops.lower_cache.LowerStates`) supplies the states below l;
        without it they are computed here. ``gate_weights`` (B x K) overrides the gate;
        ``gate_noise`` (B x K standard normal) perturbs a noisy router's logits.
        ``keep_logits`` returns the logits at the response positions only (N x V, the
        examples' in order), which distillation compares with the teacher's.
        """
        if lower is not None:
            states, pooled = lower.get(self, examples)
        else:
            pairs = self.lower_states([e.input_ids for e in examples])
            states = [h for h, _ in pairs]
            pooled = pool_gate_states(self, examples, [g for _, g in pairs])
        B = len(examples)
        probs = None
        if gate_weights is None:
            probs = self.mixture.gate_probs(pooled, B, gate_noise)
            gate_weights = self.mixture.route(probs)
        prompt, bias = self.mixture(gate_weights)
        M = prompt.shape[1]
        dtype = states[0].dtype
        shared = prompt.shape[0] == 1
        pack = Packing.build([len(h) for h in states], M, shared, device=states[0].device)
        prompt = prompt.to(dtype)
        pieces = [prompt[0]] + states if shared else [t for i, h in enumerate(states) for t in (prompt[i], h)]
        hidden = torch.cat(pieces)  # in the order of Packing.build
        hidden = self._run_packed(hidden[None], self.layers[self.inject_layer :], pack, bias)[0]
        hidden = hidden[pack.inputs]
        # each example predicts its own next tokens: shift labels within examples, never across
        target = torch.cat([torch.tensor(e.labels[1:] + [-100]) for e in examples]).to(hidden.device)
        rows = torch.cat([torch.full((len(e.input_ids),), i) for i, e in enumerate(examples)]).to(hidden.device)
        where = target != -100
        logits = at_least_float32(self.base.lm_head(self.base.model.norm(hidden[where])))
        nll = F.cross_entropy(logits, target[where], reduction="none")
        row_nll = torch.zeros(B, dtype=nll.dtype, device=nll.device).index_add(0, rows[where], nll)
        row_tokens = torch.zeros(B, dtype=torch.long, device=nll.device).index_add(0, rows[where], torch.ones_like(rows[where]))
        loss = nll.sum() / where.sum().clamp_min(1)
        return PromptedOutput(logits if keep_logits else None, loss, gate_weights, row_nll, row_tokens, probs)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask=None, gate_mask=None, labels=None, gate_weights=None,
                return_logits: bool = True) -> PromptedOutput:
        """``gate_mask`` (B x T) marks instruction tokens; default: every real token."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        gate_mask = attention_mask.bool() if gate_mask is None else gate_mask.bool() & attention_mask.bool()
        with torch.no_grad():
            hidden, gate_states, positions = self.lower(input_ids, attention_mask)
        weights, prompt, bias = self.mix(gate_states, gate_mask, input_ids.shape[0], gate_weights)
        hidden = self.upper(hidden, attention_mask.bool(), positions, prompt, bias)
        return self.head(hidden, labels, weights, return_logits)

    def head(self, hidden, labels, weights, return_logits) -> PromptedOutput:
        hidden = self.base.model.norm(hidden)
        logits = self.base.lm_head(hidden) if return_logits or labels is None else None
        loss = row_nll = row_tokens = None
        if labels is not None:
            target = labels[:, 1:]
            where = target != -100
            if logits is not None:
                picked = logits[:, :-1][where]
            else:  # the head only where the loss is taken: most of a CPU step for a 49k vocabulary
                picked = self.base.lm_head(hidden[:, :-1][where])
            nll = F.cross_entropy(at_least_float32(picked), target[where], reduction="none")
            rows = where.nonzero()[:, 0]
            row_nll = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
            row_tokens = where.sum(1)
            loss = nll.sum() / where.sum().clamp_min(1)
        return PromptedOutput(logits, loss, weights, row_nll, row_tokens)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None):
        """Greedy or sampled continuation; the gate is computed once, from the instruction.

        Returns B x (T + new) token ids, like ``transformers``' ``generate``. Works with
        left or right padding (positions come from the attention mask).
        """
        from transformers import DynamicCache

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = self.base.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        cache = DynamicCache(config=self.base.config)
        keys = attention_mask.bool()
        hidden, gate_states, positions = self.lower(input_ids, attention_mask, cache)
        weights, prompt, bias = self.mix(gate_states, keys, input_ids.shape[0])
        # A shared prompt's keys and values are computed alone, as mops-serve computes them once.
        hidden = self.upper(hidden, keys, positions, prompt, bias, cache, self.shared_prompt_kv())
        # Each row continues from its own last real token (left or right padding).
        last = keys.shape[1] - 1 - keys.flip(1).long().argmax(1)
        next_hidden = hidden[torch.arange(len(last)), last]
        out, done = input_ids, torch.zeros(len(last), dtype=torch.bool, device=input_ids.device)
        M = prompt.shape[1]
        dtype = hidden.dtype
        for _ in range(max_new_tokens):
            logits = self.base.lm_head(self.base.model.norm(next_hidden)).float()
            if do_sample:
                token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            else:
                token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, next(iter(eos), 0)), token)
            out = torch.cat([out, token[:, None]], dim=1)
            done = done | torch.isin(token, torch.tensor(sorted(eos) or [-1], device=token.device))
            if done.all():
                break
            keys = torch.cat([keys, keys.new_ones(len(token), 1)], dim=1)
            step_pos = (keys.long().sum(1) - 1)[:, None]
            h = self.base.model.embed_tokens(token[:, None])
            lower_mask = input_rows_mask(keys, 0, 1, None, self._additive(None), dtype)
            h = self._run(h, self.layers[: self.inject_layer], lower_mask, step_pos, cache)
            upper_mask = input_rows_mask(keys, M, 1, bias, self._additive(bias), dtype)
            h = self._run(h, self.layers[self.inject_layer :], upper_mask, step_pos + M, cache)
            next_hidden = h[:, -1]
        return out
