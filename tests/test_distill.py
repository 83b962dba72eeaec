"""Distillation from the dense model: the bucketed KL against an independent float64 one,
the teacher's targets lined up with the student's response positions, and the trainer's
one-line refusals."""

import pytest
import torch
import transformers

from mops.data import encode_example, load_records, split_records
from mops.distill import TeacherTargets, bucket_kl
from mops.errors import UserError
from mops.injection import PromptedLM
from mops.mixture import MixtureConfig
from mops.models import load_model
from mops.train import TrainConfig, recover


def reference_kl(student_logits, teacher_logits, k):
    """KL(teacher || student) over the teacher's top k tokens and one bucket for the rest,
    in float64, bucket by bucket from the two full distributions."""
    total = 0.0
    for s_row, t_row in zip(student_logits.double(), teacher_logits.double()):
        s, t = s_row.softmax(-1), t_row.softmax(-1)
        top = t.topk(k).indices
        rest = torch.ones_like(t, dtype=torch.bool)
        rest[top] = False
        p = torch.cat([t[top], t[rest].sum()[None]])
        q = torch.cat([s[top], s[rest].sum()[None]])
        keep = p > 0
        total += (p[keep] * (p[keep] / q[keep]).log()).sum()
    return total / len(student_logits)


@pytest.mark.parametrize("k", [1, 7, 50])
def test_the_bucketed_kl_equals_a_float64_reference(k):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 50) * 3, torch.randn(6, 50) * 3
    logp = torch.log_softmax(teacher, -1)
    top, ids = logp.topk(k, -1)
    got = bucket_kl(student, top, ids)
    assert got.item() == pytest.approx(reference_kl(student, teacher, k).item(), rel=1e-5, abs=1e-6)
    if k == 50:  # every token its own bucket: the full KL
        full = torch.nn.functional.kl_div(torch.log_softmax(student.double(), -1), logp.double(), log_target=True,
                                          reduction="batchmean")
        assert got.item() == pytest.approx(full.item(), rel=1e-5)
    assert bucket_kl(teacher, top, ids).abs().item() < 1e-5  # a student that is the teacher: nothing to learn


def test_the_kl_gradient_pulls_the_student_toward_the_teacher():
    torch.manual_seed(1)
    student = (torch.randn(4, 30) * 2).requires_grad_()
    logp = torch.log_softmax(torch.randn(4, 30) * 2, -1)
    top, ids = logp.topk(5, -1)
    before = bucket_kl(student, top, ids)
    before.backward()
    with torch.no_grad():
        after = bucket_kl(student - 0.1 * student.grad, top, ids)
    assert after < before


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


def test_teacher_targets_line_up_with_the_students_response_positions(tiny):
    model, tok = tiny
    records = load_records(["dolly", "natural-instructions"], limit_per_source=4)
    examples = [encode_example(tok, r, 64) for r in records[:4]]
    teacher = TeacherTargets(model, top_k=16)
    top, ids = teacher.get(examples, "cpu")
    responses = sum(sum(t != -100 for t in e.labels[1:]) for e in examples)
    assert top.shape == ids.shape == (responses, 16)
    # the bare model packed (as training runs it) against itself unpacked, one example at a time
    out = PromptedLM.bare(model).forward_examples(examples, keep_logits=True)
    assert out.logits.shape == (responses, model.config.vocab_size)
    assert bucket_kl(out.logits, top, ids).abs().item() < 1e-6
    assert torch.equal(out.logits.topk(3).indices, ids[:, :3])  # position by position, the same leaders
    assert not torch.equal(out.logits.roll(1, 0).topk(3).indices, ids[:, :3])  # (which a misalignment breaks)
    teacher.get(examples[:2], "cpu")
    assert teacher.computed == 4  # each example ran through the teacher once
    half_top, half_ids = teacher.get(examples[:1], "cpu", "bf16")  # under bf16 autocast: kept apart
    assert teacher.computed == 5 and not torch.equal(half_top, top[: len(half_top)])
    assert torch.allclose(half_top.exp(), top[: len(half_top)].exp(), atol=0.02)


def test_distillation_moves_the_recovered_model_toward_the_dense_one(tiny_dir, tokenizer, tmp_path):
    dense, tok = load_model(tiny_dir)
    pruned, _ = load_model(tiny_dir)
    with torch.no_grad():  # a crude 75% magnitude pruning of every decoder projection
        for layer in pruned.model.layers:
            for lin in [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]:
                lin.weight[lin.weight.abs() < lin.weight.abs().quantile(0.75)] = 0
    splits = split_records(load_records(["dolly", "natural-instructions"], limit_per_source=60))
    held = [encode_example(tok, r, 96) for r in splits["validation"][:8]]
    teacher = TeacherTargets(dense)
    held_targets = teacher.get(held, "cpu")

    def kl(lm):
        with torch.no_grad():
            return bucket_kl(lm.forward_examples(held, keep_logits=True).logits, *held_targets).item()

    config = TrainConfig(steps=12, batch_size=4, max_len=96, eval_every=12, eval_examples=4, gate_pretrain_steps=0,
                         checkpoint_every=12, distill=1.0, lr=0.05)
    mixture = MixtureConfig(n_experts=1, prompt_len=4, gate="single", inject_layer=1)
    start, _ = recover(pruned, tok, splits, mixture, TrainConfig(steps=1, lr=1e-9, max_len=96, eval_every=1,
                       eval_examples=4, gate_pretrain_steps=0), progress=False)
    lm, history = recover(pruned, tok, splits, mixture, config, progress=False, teacher=teacher)
    assert kl(lm) < 0.9 * kl(start)
    assert len(history["train_loss"]) == 12  # the response NLL, recorded as without distillation


def test_distillation_is_refused_without_a_teacher_or_with_another_vocabulary(tiny, tiny_dir):
    model, tok = tiny
    splits = split_records(load_records(["dolly"], limit_per_source=20))
    mixture = MixtureConfig(n_experts=1, prompt_len=2, gate="single")
    with pytest.raises(UserError, match="--distill 0.5: distillation needs the dense model"):
        recover(model, tok, splits, mixture, TrainConfig(steps=1, distill=0.5), progress=False)
    with pytest.raises(UserError, match="--distill 1.5: expected a weight from 0 to 1"):
        TrainConfig(distill=1.5).validate()
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UserError, match="vocabulary of 100 tokens, the model 49,152"):
        recover(model, tok, splits, mixture, TrainConfig(steps=1, distill=0.5), progress=False,
                teacher=TeacherTargets(other))
