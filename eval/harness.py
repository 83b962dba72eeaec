"""lm-evaluation-harness model ``mops``: a (pruned) checkpoint, optionally steered by a MoPs adapter.

``model_args``: ``pretrained`` (a checkpoint folder, a ``.gguf`` file or the embedded
default ``smollm2-135m``; default the latter), ``adapter`` (a folder written by
``mops-recover``; optional), ``dtype`` (float32), ``device`` (cuda if available, else cpu),
``batch_size``, ``max_length`` (text tokens per forward; the prompt's positions come on top)
and ``check_base`` (refuse an adapter trained on another base; default true).

Without an adapter this is lm-eval's own ``HFLM`` on the model that
:func:`mops.models.load_model` loads, request for request. With an adapter,
loglikelihood requests run through :class:`mops.injection.PromptedLM` with the gate
pooling the *context* tokens only: lm-eval concatenates context and continuation into one
input, and a gate that saw the continuation would let a multiple-choice answer choose the
prompt that scores it. Rolling windows follow the same rule (their context is the window's
lead-in token), and generation computes the gate once from the prompt.

Importing this module registers the model; :func:`lm_eval.simple_evaluate` then accepts
``model="mops"``. lm-eval 0.4 has no plugin entry point, so its own command line finds the
model only through ``python -m mops.eval.lm_eval_cli`` (which imports this module first).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import resolve_max_length
from tqdm.auto import tqdm

from mops.errors import UserError
from mops.injection import PromptedLM

log = logging.getLogger(__name__)

MODEL_NAME = "mops"


def prompt_positions(lm: PromptedLM | None) -> int:
    """Positions the prompt occupies in front of the input (0 without an adapter)."""
    return 0 if lm is None else lm.mixture.prompt_positions


def window(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], int]:
    """HFLM's input for a (context, continuation) request, and how many of its leading tokens
    are context (what the gate may pool): ``(context + continuation)[-(L + 1):][:-1]``, so the
    input holds every continuation token but the last, and at least one context token."""
    inp = (context + continuation)[-(max_length + 1):][:-1]
    return inp, len(inp) - len(continuation) + 1


def _as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise UserError(f"check_base={value!r}: expected true or false")


@register_model(MODEL_NAME)
class MopsLM(HFLM):
    """HFLM over a model loaded by :mod:`mops.models`, plus an optional MoPs adapter."""

    def __init__(self, pretrained: str = "smollm2-135m", adapter: str | None = None, dtype: str = "float32",
                 device: str | None = None, batch_size: int | str = 1, max_length: int | None = None,
                 check_base: bool | str = True, **kwargs):
        from mops.adapter import load
        from mops.models import load_model

        if not isinstance(pretrained, (str, Path)):
            raise UserError("model_args pretrained: expected a checkpoint folder, a .gguf file or smollm2-135m "
                            "(wrap a loaded model with lm-eval's HFLM instead)")
        if adapter is not None and not Path(adapter).is_dir():
            raise UserError(f"adapter {str(adapter)!r}: no such folder; expected a folder written by mops-recover")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line asks for cuda:0 by default; like HFLM, fall back to the CPU.
            if device is not None:
                log.warning("mops model: device %s asked for, but no CUDA device is available; using cpu", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(pretrained, dtype=dtype, device=device)
        self.prompted = None if adapter is None else load(model, adapter, check_base=_as_bool(check_base))
        self.base_spec, self.adapter_dir = str(pretrained), None if adapter is None else str(adapter)
        if self.prompted is not None and str(batch_size).startswith("auto"):
            raise UserError(f"batch_size={batch_size}: with an adapter give a number (auto-detection would probe "
                            "the model without the prompt)")
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                         max_length=None if max_length is None else int(max_length), **kwargs)
        positions = resolve_max_length(model.config, tokenizer, default=self._DEFAULT_MAX_LENGTH)
        extra = prompt_positions(self.prompted)
        if self._max_length and self._max_length + extra > positions:
            raise UserError(f"max_length={self._max_length}: with the adapter's {extra} prompt positions that needs "
                            f"{self._max_length + extra} positions; the model has {positions}")
        # HFLM.__init__ stored the model object here; lm-eval's logs and get_model_info read it.
        self.pretrained = self.base_spec

    # ------------------------------------------------------------------ sizes
    @property
    def max_length(self) -> int:
        """Text tokens per forward pass: the model's positions minus the prompt's, unless given."""
        if self._max_length:
            return self._max_length
        total = resolve_max_length(self.model.config, self.tokenizer, default=self._DEFAULT_MAX_LENGTH)
        return total - prompt_positions(self.prompted)

    # ------------------------------------------------------------------ loglikelihood
    def _model_call(self, inps, attn_mask=None, labels=None):
        # Only batch-size probing reaches this with an adapter (refused above); keep the base path.
        if self.prompted is None:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            return self.prompted(inps).logits

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.prompted is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        return self._prompted_loglikelihood(requests, disable_tqdm, override_bs)

    @torch.no_grad()
    def _prompted_loglikelihood(self, requests, disable_tqdm: bool, override_bs: int | None):
        """Like HFLM's loop, with the gate pooling each request's context tokens.

        Requests whose inputs and gate tokens coincide (multiple choice with one-token
        answers) share one forward pass, as HFLM's logits cache does; requests with the same
        input but a different context/continuation split do not, since their gates differ.
        """
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError("loglikelihood requests need a non-empty context and continuation")
            if len(continuation) > self.max_length:
                raise UserError(f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
            inp, n_gate = window(context, continuation, self.max_length)
            groups[(tuple(inp), n_gate)].append(i)
        keys = sorted(groups, key=lambda k: (-len(k[0]), k))  # longest first, as HFLM does
        batch_size = override_bs or int(self.batch_size)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            width = len(chunk[0][0])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            gate = torch.zeros(len(chunk), width, dtype=torch.bool)
            for row, (inp, n_gate) in enumerate(chunk):
                ids[row, : len(inp)] = torch.tensor(inp)
                mask[row, : len(inp)] = 1
                gate[row, :n_gate] = True
            logits = self.prompted(ids.to(self.device), mask.to(self.device), gate.to(self.device)).logits
            logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            for row, key in enumerate(chunk):
                inplen = len(key[0])
                for i in groups[key]:
                    request_str, _, continuation = requests[i]
                    scored = logprobs[row, inplen - len(continuation) : inplen]
                    cont = torch.tensor(continuation, device=scored.device)
                    greedy = bool((scored.argmax(-1) == cont).all())
                    answer = (float(scored.gather(1, cont[:, None]).sum()), greedy)
                    results[i] = answer
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    pbar.update(1)
        pbar.close()
        return results

    # ------------------------------------------------------------------ generation
    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        if self.prompted is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        attention_mask = generation_kwargs.pop("attention_mask", None)
        do_sample = bool(generation_kwargs.pop("do_sample", False))
        temperature = float(generation_kwargs.pop("temperature", 1.0) or 1.0)
        unused = set(generation_kwargs) - {"top_p", "top_k"} if do_sample else set(generation_kwargs)
        if unused:
            log.warning("mops model: generation settings %s are not used with an adapter", sorted(unused))
        # No early stop on `stop` strings: lm-eval cuts the text at the first stop string
        # afterwards, so running on to EOS or max_length changes cost, not the answer.
        return self.prompted.generate(context, attention_mask, max_new_tokens=max_length - context.shape[1],
                                      do_sample=do_sample, temperature=temperature,
                                      eos_token_id=self.tokenizer.eos_token_id)

    # ------------------------------------------------------------------ reporting
    def get_model_info(self) -> dict:
        """What the results file records about the model; offline (HFLM's asks the hub)."""
        info = {
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(self._model.dtype),
            "base": self.base_spec,
            "adapter": self.adapter_dir,
            "prompt_positions": prompt_positions(self.prompted),
            "max_length": self.max_length,
        }
        if self.prompted is not None:
            info["mixture"] = dict(vars(self.prompted.mixture.config))
        return info
