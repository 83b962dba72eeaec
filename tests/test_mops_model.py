"""The prompted model against independent references: the base model itself, PEFT prompt
tuning, and one plain prompt; plus the gate's blindness to responses and padding."""

import copy

import pytest
import torch

from mops.errors import UserError
from mops.injection import PromptedLM
from mops.mixture import Mixture, MixtureConfig
from mops.models import load_model


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


def prompted(model, init=None, **kw):
    config = MixtureConfig(**kw).resolved(model.config.num_hidden_layers)
    return PromptedLM(model, Mixture(config, model.config.hidden_size, init=init))


def batch(seed=0, B=2, T=12, pad_row_from=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 2000, (B, T), generator=g)
    mask = torch.ones_like(ids)
    if pad_row_from is not None:
        mask[1, pad_row_from:] = 0
    return ids, mask


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("g,l", [(1, 1), (0, 0), (2, 1), (0, 1), (2, 0)])
def test_without_prompt_vectors_logits_equal_the_base_exactly(tiny, impl, g, l):
    model, _ = tiny
    model.config._attn_implementation = impl
    try:
        for gate, combine in [("mops", "interpolate"), ("attempt", "attention"), ("uniform", "attention")]:
            lm = prompted(model, n_experts=3, prompt_len=0, gate=gate, combine=combine, gate_layer=g, inject_layer=l)
            ids, mask = batch(pad_row_from=7)
            with torch.no_grad():
                ref = model(ids, attention_mask=mask).logits
                out = lm(ids, mask).logits
            assert torch.equal(out[0], ref[0])
            assert torch.equal(out[1, :7], ref[1, :7])
    finally:
        model.config._attn_implementation = "sdpa"


def test_l0_single_prompt_equals_peft_prompt_tuning(tiny):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model, _ = tiny
    m = 6
    init = torch.randn(1, m, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.3
    lm = prompted(model, init=init, n_experts=1, prompt_len=m, gate="single", gate_layer=0, inject_layer=0)
    peft = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m))
    peft.prompt_encoder["default"].embedding.weight.data = init[0].clone()
    ids, mask = batch(seed=2, T=15)
    with torch.no_grad():
        ours = lm(ids, mask).logits
        ref = peft(input_ids=ids, attention_mask=mask).logits[:, m:]
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        ours_gen = lm.generate(ids[:1], max_new_tokens=6)
        ref_gen = peft.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(ours_gen, ref_gen)


def test_attention_mode_with_a_uniform_gate_equals_one_plain_prompt_of_all_experts(tiny):
    model, _ = tiny
    K, m, d = 3, 4, model.config.hidden_size
    init = torch.randn(K, m, d, generator=torch.Generator().manual_seed(3)) * 0.3
    mixture = prompted(model, init=init, n_experts=K, prompt_len=m, combine="attention", gate_layer=1, inject_layer=1)
    plain = prompted(model, init=init.reshape(1, K * m, d), n_experts=1, prompt_len=K * m, gate="single",
                     gate_layer=1, inject_layer=1)
    ids, mask = batch(seed=4, pad_row_from=9)
    with torch.no_grad():
        ours = mixture(ids, mask, gate_weights=torch.full((2, K), 1 / K)).logits  # log(K * 1/K) = 0
        ref = plain(ids, mask).logits
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1, :9], ref[1, :9], rtol=1e-5, atol=1e-5)
    # and the bias does act: down-weighting one expert changes the output
    with torch.no_grad():
        skewed = mixture(ids, mask, gate_weights=torch.tensor([[0.98, 0.01, 0.01]] * 2)).logits
    assert not torch.allclose(skewed, ours, atol=1e-4)


@pytest.mark.parametrize("gate", ["mops", "attempt"])
def test_gate_weights_ignore_response_tokens_and_padding(tiny, gate):
    model, _ = tiny
    torch.manual_seed(0)
    lm = prompted(model, init=torch.randn(4, 3, model.config.hidden_size) * 0.3, n_experts=3, prompt_len=3, gate=gate,
                  gate_layer=1, inject_layer=1)
    ids, mask = batch(seed=5, T=14)
    gate_mask = torch.zeros_like(mask, dtype=torch.bool)
    gate_mask[:, :8] = True  # the first 8 tokens are the instruction
    other = ids.clone()
    other[:, 8:] = torch.randint(3, 2000, (2, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        w1 = lm(ids, mask, gate_mask).gate_weights
        w2 = lm(other, mask, gate_mask).gate_weights
        w_all = lm(ids, mask).gate_weights
    assert torch.equal(w1, w2)
    assert not torch.allclose(w1, w_all)  # the mask matters: responses would have moved the gate
    # left padding does not move the gate either
    left_ids = torch.cat([torch.full((2, 3), 2), ids[:, :8]], 1)
    left_mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        w_left = lm(left_ids, left_mask).gate_weights
        w_plain = lm(ids[:, :8], torch.ones(2, 8, dtype=torch.long)).gate_weights
    torch.testing.assert_close(w_left, w_plain, rtol=1e-5, atol=1e-6)


def test_left_and_right_padding_give_the_same_logits_and_generations(tiny):
    model, _ = tiny
    torch.manual_seed(1)
    lm = prompted(model, init=torch.randn(2, 5, model.config.hidden_size) * 0.3, n_experts=2, prompt_len=5,
                  combine="attention", gate_layer=1, inject_layer=1)
    short = torch.randint(3, 2000, (6,), generator=torch.Generator().manual_seed(2))
    long = torch.randint(3, 2000, (9,), generator=torch.Generator().manual_seed(3))
    right = torch.stack([torch.cat([short, torch.full((3,), 2)]), long])
    right_mask = torch.tensor([[1] * 6 + [0] * 3, [1] * 9])
    left = torch.stack([torch.cat([torch.full((3,), 2), short]), long])
    left_mask = torch.tensor([[0] * 3 + [1] * 6, [1] * 9])
    with torch.no_grad():
        r = lm(right, right_mask).logits
        l_ = lm(left, left_mask).logits
        alone = lm(short[None], torch.ones(1, 6, dtype=torch.long)).logits
    torch.testing.assert_close(r[0, :6], l_[0, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r[0, :6], alone[0], rtol=1e-5, atol=1e-5)
    gen_left = lm.generate(left, left_mask, max_new_tokens=5)[0, 9:]
    gen_alone = lm.generate(short[None], max_new_tokens=5)[0, 6:]
    assert torch.equal(gen_left, gen_alone)


@pytest.mark.parametrize("combine,gate,shared", [("attention", "mops", True), ("attention", "attempt", True),
                                                  ("interpolate", "uniform", True), ("interpolate", "mops", False)])
def test_a_shared_prompts_keys_and_values_computed_once_give_the_full_forwards_states(tiny, combine, gate, shared):
    """What PromptedLM.generate and mops-serve do: the prompt alone through the upper layers
    once, then only the input's tokens (its gate bias on the prompt's columns)."""
    from transformers import DynamicCache

    model, _ = tiny
    torch.manual_seed(2)
    lm = prompted(model, init=torch.randn(4, 3, model.config.hidden_size) * 0.3, n_experts=3, prompt_len=3,
                  combine=combine, gate=gate, gate_layer=1, inject_layer=1)
    assert lm.mixture.prompt_is_shared == shared
    kv = lm.shared_prompt_kv()
    if not shared:  # each input's own interpolated prompt: nothing to share
        assert kv is None
        return
    assert len(kv) == model.config.num_hidden_layers - 1 and kv[0][0].shape[2] == lm.mixture.prompt_positions
    ids, mask = batch(seed=7, T=10, pad_row_from=6)
    keys = mask.bool()
    with torch.no_grad():
        hidden, gate_states, positions = lm.lower(ids, mask)
        _, prompt, bias = lm.mix(gate_states, keys, 2)
        full = lm.upper(hidden, keys, positions, prompt, bias, DynamicCache(config=model.config))
        once = lm.upper(hidden, keys, positions, prompt, bias, DynamicCache(config=model.config), prompt_kv=kv)
    torch.testing.assert_close(once[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(once[1, :6], full[1, :6], rtol=1e-5, atol=1e-5)


def test_without_prompt_generation_equals_the_base_generate(tiny):
    model, _ = tiny
    lm = prompted(model, n_experts=2, prompt_len=0, gate_layer=1, inject_layer=1)
    ids, mask = batch(seed=6, B=1, T=10)
    ours = lm.generate(ids, mask, max_new_tokens=8)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert torch.equal(ours, ref)


def test_frozen_experts_receive_no_gradient(tiny):
    model, _ = tiny
    d = model.config.hidden_size
    lm = prompted(model, init=torch.randn(3, 4, d) * 0.3, n_experts=3, prompt_len=4, gate_layer=1, inject_layer=1)
    source_prompt = torch.randn(4, d)
    lm.mixture.experts.freeze(1, source_prompt)
    ids, mask = batch(seed=7)
    out = lm(ids, mask, labels=ids)
    out.loss.backward()
    grad = lm.mixture.experts.weight.grad
    assert grad[1].abs().sum() == 0 and grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert torch.equal(lm.mixture.experts.weight[1].detach(), source_prompt)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in lm.mixture.gate.parameters())


@pytest.mark.parametrize("kw,message", [
    (dict(n_experts=0), "--experts 0"),
    (dict(prompt_len=-1), "--prompt-len -1"),
    (dict(gate_layer=3), "--gate-layer 3: expected a layer in \\[0, 2\\]"),
    (dict(inject_layer=-1), "--inject-layer -1"),
    (dict(inject_layer=2), "--inject-layer 2: expected a layer in \\[0, 1\\]"),  # a prompt needs a layer to enter
    (dict(gate="moe"), "--gate 'moe'"),
    (dict(combine="concat"), "--combine 'concat'"),
    (dict(gate="single", n_experts=3), "--experts 1"),
])
def test_bad_mixture_settings_are_refused(kw, message):
    with pytest.raises(UserError, match=message):
        MixtureConfig(**kw).resolved(2)
