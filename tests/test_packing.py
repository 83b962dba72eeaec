"""Packed training and the lower-layer store against the padded forward they replace:
the same loss and the same gradients, in float64 on a tiny model, for every kind of mixture."""

import copy

import pytest
import torch

from mops.data import encode_example, load_records, pad_batch
from mops.injection import PromptedLM
from mops.lower_cache import LowerStates, pooled_gate_inputs
from mops.mixture import Mixture, MixtureConfig
from mops.models import load_model


@pytest.fixture(scope="module")
def tiny64(tiny_dir):
    model, tok = load_model(tiny_dir)
    return model.double(), tok


@pytest.fixture(scope="module")
def examples(tiny64):
    _, tok = tiny64
    records = load_records(["dolly", "natural-instructions"], limit_per_source=6)
    return [encode_example(tok, r, 48) for r in records[:5]]


def prompted(model, seed=0, **kw):
    config = MixtureConfig(**kw).resolved(model.config.num_hidden_layers)
    torch.manual_seed(seed)
    K = config.n_prompts
    init = torch.randn(K, config.prompt_len, model.config.hidden_size) * 0.3
    shared = torch.randn(config.shared_len, model.config.hidden_size) * 0.3
    # the mixture stays float32 (its gate pools in float32 whatever the base's dtype); the base is float64
    return PromptedLM(model, Mixture(config, model.config.hidden_size, init=init, shared_init=shared))


def padded_loss(lm, examples, pad_id):
    b = pad_batch(examples, pad_id, side="right")
    return lm(b["input_ids"], b["attention_mask"], b["gate_mask"], b["labels"], return_logits=False)


def grads(lm, loss):
    params = [p for p in lm.mixture.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def assert_same_gradients(ours, ref):
    """Float32 gradients (the mixture's dtype) of float64 losses: equal to float32 precision."""
    for g, r in zip(ours, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))


MIXTURES = [
    dict(n_experts=3, prompt_len=4, gate="mops", combine="interpolate", gate_layer=1),
    dict(n_experts=3, prompt_len=4, gate="mops", combine="attention", gate_layer=1),
    dict(n_experts=3, prompt_len=4, gate="mops", combine="attention", gate_layer=2, inject_layer=1, top_k=1),
    dict(n_experts=3, prompt_len=4, gate="mops", combine="interpolate", gate_layer=0, inject_layer=1, gate_hidden=0,
         top_k=2),
    dict(n_experts=2, prompt_len=3, gate="attempt", combine="interpolate", gate_layer=1, inject_layer=0),
    dict(n_experts=2, prompt_len=3, gate="attempt", combine="attention", gate_layer=2, inject_layer=1),
    dict(n_experts=3, prompt_len=4, gate="uniform", combine="interpolate", gate_layer=1),
    dict(n_experts=1, prompt_len=6, gate="single", gate_layer=0, inject_layer=0),
    dict(n_experts=3, prompt_len=2, gate="mops", combine="attention", gate_layer=1, shared_len=3, top_k=1),
    dict(n_experts=3, prompt_len=2, gate="mops", combine="interpolate", gate_layer=1, shared_len=3),
]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kw", MIXTURES, ids=lambda kw: f"{kw['gate']}-{kw.get('combine', '')}-g{kw['gate_layer']}")
def test_packed_loss_and_gradients_equal_the_padded_forward(tiny64, examples, kw, impl):
    model, tok = tiny64
    model.config._attn_implementation = impl
    try:
        lm = prompted(model, **kw)
        ref = padded_loss(lm, examples, tok.pad_token_id)
        out = lm.forward_examples(examples)
        # float64 base, float32 gate and prompts: equal to the float32 rounding of the gate's input
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-7, atol=0)
        torch.testing.assert_close(out.row_nll, ref.row_nll, rtol=1e-7, atol=0)
        assert torch.equal(out.row_tokens, ref.row_tokens)
        torch.testing.assert_close(out.gate_weights, ref.gate_weights, rtol=1e-6, atol=1e-7)
        assert_same_gradients(grads(lm, out.loss), grads(lm, ref.loss))
    finally:
        model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("kw", [MIXTURES[1], MIXTURES[3], MIXTURES[5]], ids=["mops", "router", "attempt"])
def test_the_cached_lower_layers_give_the_same_loss_and_gradients(tiny64, examples, kw):
    model, _ = tiny64
    lm = prompted(model, **kw)
    store = LowerStates()
    first = lm.forward_examples(examples[:3], lower=store)
    assert store.computed == 3
    cached = lm.forward_examples(examples, lower=store)  # 3 of 5 from the store
    assert store.computed == 5
    again = lm.forward_examples(examples, lower=store)
    assert store.computed == 5  # nothing run twice
    plain = lm.forward_examples(examples)
    assert torch.equal(cached.loss, plain.loss)  # an example's lower states never depend on its company
    assert torch.equal(cached.loss, again.loss)
    assert_same_gradients(grads(lm, cached.loss), grads(lm, plain.loss))
    torch.testing.assert_close(first.row_nll, plain.row_nll[:3], rtol=1e-7, atol=0)


def test_the_store_is_emptied_for_another_base_or_other_layers(tiny_dir, tiny64, examples):
    model, _ = tiny64
    store = LowerStates()
    lm = prompted(model, n_experts=2, prompt_len=2, gate="mops", gate_layer=1)
    before = store.get(lm, examples[:2])[0][0].clone()
    other, _ = load_model(tiny_dir)
    other = other.double()
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(2)
    lm_other = prompted(other, n_experts=2, prompt_len=2, gate="mops", gate_layer=1)
    after = store.get(lm_other, examples[:2])[0][0]
    assert store.computed == 4 and not torch.allclose(before, after)
    store.get(prompted(other, n_experts=2, prompt_len=2, gate="mops", gate_layer=2, inject_layer=1), examples[:2])
    assert store.computed == 6  # other layers: computed again


def test_a_store_asked_by_two_copies_of_one_base_in_turn_hashes_each_once_and_keeps_its_states(tiny64, examples):
    """benchmarks/step_cost.py times a compiled copy of the base between steps of the original:
    hashing the weights again at every switch would be timed as part of the stored step."""
    model, _ = tiny64
    store = LowerStates()
    kw = dict(n_experts=2, prompt_len=2, gate="mops", gate_layer=1)
    lm, lm_copy = prompted(model, **kw), prompted(copy.deepcopy(model), **kw)
    for _ in range(3):
        store.get(lm, examples[:2])
        store.get(lm_copy, examples[:2])
    assert store.hashed == 2 and store.computed == 2


def test_pooled_gate_inputs_are_the_gates_own_pooling_of_its_layer(tiny64, examples):
    model, tok = tiny64
    for gate in ("mops", "attempt"):
        lm = prompted(model, n_experts=2, prompt_len=2, gate=gate, gate_layer=1, inject_layer=0)
        b = pad_batch(examples, tok.pad_token_id)
        with torch.no_grad():  # hidden_states[1]: entering layer 1
            states = model(b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states[1]
            ref = lm.mixture.gate.pool(states, b["gate_mask"])
        torch.testing.assert_close(pooled_gate_inputs(lm, examples), ref, rtol=1e-10, atol=1e-12)


def test_top_k_of_all_experts_is_soft_routing_and_top_1_keeps_one_weight(tiny64, examples):
    model, _ = tiny64
    soft = prompted(model, n_experts=3, prompt_len=4, gate="mops", gate_layer=1)
    top3 = prompted(model, n_experts=3, prompt_len=4, gate="mops", gate_layer=1, top_k=3)
    top1 = prompted(model, n_experts=3, prompt_len=4, gate="mops", gate_layer=1, top_k=1)
    top3.mixture.load_state_dict(soft.mixture.state_dict())
    top1.mixture.load_state_dict(soft.mixture.state_dict())
    a, b, c = (lm.forward_examples(examples) for lm in (soft, top3, top1))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.gate_weights, b.gate_weights)
    assert ((c.gate_weights > 0).sum(1) == 1).all()
    torch.testing.assert_close(c.gate_weights.max(1).values, a.gate_weights.max(1).values)  # not renormalised
    assert all(g.abs().sum() > 0 for g in grads(top1, c.loss))  # the router still learns through its weight


@pytest.mark.parametrize("kw", MIXTURES, ids=lambda kw: f"{kw['gate']}-{kw.get('combine', '')}-g{kw['gate_layer']}")
def test_prompt_positions_are_the_positions_the_mixture_prepends(tiny64, kw):
    model, _ = tiny64
    mixture = prompted(model, **kw).mixture
    K = mixture.config.n_experts
    prompt, _ = mixture(torch.full((2, K), 1 / K))
    assert mixture.prompt_positions == prompt.shape[1]


def test_the_lower_layers_run_in_full_precision_under_autocast(tiny_dir, examples):
    """``--mixed-precision bf16`` lowers the upper layers only: the stored states below l are
    the float32 ones whichever run filled the store, so runs sharing it stay comparable."""
    model, _ = load_model(tiny_dir)  # float32: what bf16 autocast would lower
    lm = prompted(model, **MIXTURES[1])
    plain = LowerStates().states(lm, examples)
    store = LowerStates()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = store.states(lm, examples)
        mixed = lm.forward_examples(examples, lower=store).loss
    for (h, _), (h_mixed, _) in zip(plain, under):
        assert h_mixed.dtype == torch.float32 and torch.equal(h, h_mixed)
    full = lm.forward_examples(examples, lower=store).loss
    assert not torch.equal(mixed, full)  # the upper layers did run in bfloat16
    torch.testing.assert_close(mixed, full, rtol=2e-2, atol=0)
