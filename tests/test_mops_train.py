"""Training, adapters on disk, resume, and the mops-recover command on a tiny model."""

import json
import math

import pytest
import torch

import mops
from mops.adapter import save_adapter, weights_hash
from mops.data import load_records, split_records
from mops.errors import UserError
from mops.mixture import MixtureConfig
from mops.models import load_model
from mops.recover_cli import checkpoint_dir_for, entry
from mops.lower_cache import pooled_gate_inputs
from mops.train import TrainConfig, category_targets, recover, resolve_mixed_precision, schedule_lr, trainable_groups
from mops.data import encode_example, pad_batch


@pytest.fixture(scope="module")
def splits():
    return split_records(load_records(["dolly", "natural-instructions"], limit_per_source=80))


def small(**kw):
    defaults = dict(steps=4, batch_size=2, eval_every=2, eval_examples=8, gate_pretrain_steps=10,
                    gate_pretrain_examples=64, max_len=96, checkpoint_every=2)
    return TrainConfig(**{**defaults, **kw})


def test_only_experts_and_gate_train_and_the_base_is_bitwise_unchanged(tiny_dir, splits):
    model, tok = load_model(tiny_dir)
    before = weights_hash(model)
    mixture = MixtureConfig(n_experts=3, prompt_len=4, gate="mops", gate_layer=1)
    lm, history = recover(model, tok, splits, mixture, small(), progress=False)
    assert weights_hash(model) == before
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == {"mixture.experts.weight", "mixture.gate.router.weight", "mixture.gate.router.bias"}
    assert len(history["train_loss"]) == 4 and [v["step"] for v in history["validation"]] == [0, 2, 4]
    assert len(history["gate_pretrain_loss"]) == 10
    assert history["gate_pretrain_loss"][-1] < history["gate_pretrain_loss"][0]


def test_experts_start_at_the_scale_of_the_residual_stream(tiny_dir, splits):
    model, tok = load_model(tiny_dir)
    lm, _ = recover(model, tok, splits, MixtureConfig(n_experts=2, prompt_len=8, gate="uniform", inject_layer=1),
                    small(steps=1, lr=1e-4), progress=False)  # one small step: the start's scale
    ids = torch.tensor([encode_example(tok, splits["train"][0]).input_ids])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1]  # entering layer 1
    ratio = lm.mixture.experts.weight.norm(dim=-1).mean() / hidden.norm(dim=-1).mean()
    assert 0.5 < ratio < 2.0


def test_save_load_roundtrip_and_a_different_base_is_refused(tmp_path, tiny_dir, tiny_untied_dir, splits):
    model, tok = load_model(tiny_dir)
    lm, _ = recover(model, tok, splits, MixtureConfig(n_experts=2, prompt_len=3, gate="attempt", combine="attention",
                                                      gate_layer=1), small(steps=2), progress=False)
    save_adapter(lm, tmp_path / "ad", base_name=tiny_dir)
    loaded = mops.load(tiny_dir, tmp_path / "ad")
    ids = torch.randint(3, 2000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, loaded(ids).logits)
    assert torch.equal(lm.generate(ids[:1], max_new_tokens=4), loaded.generate(ids[:1], max_new_tokens=4))
    with pytest.raises(UserError, match="was trained on .* not on this base"):
        mops.load(tiny_untied_dir, tmp_path / "ad")
    with pytest.raises(UserError, match="no mops_config.json"):
        mops.load(tiny_dir, tmp_path / "missing")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_killed_run_resumes_to_the_same_adapter(tmp_path, tiny_dir, splits, schedule):
    mixture = MixtureConfig(n_experts=2, prompt_len=3, gate="mops", gate_layer=1)
    config = small(steps=6, checkpoint_every=2, eval_every=3, lr_schedule=schedule)
    model, tok = load_model(tiny_dir)
    whole, whole_history = recover(model, tok, splits, mixture, config, checkpoint_dir=tmp_path / "a", progress=False)

    class Killed(Exception):
        pass

    def kill_at_5(step, history):
        if step == 5:
            raise Killed  # after the step-4 checkpoint, before the step-6 one

    model, tok = load_model(tiny_dir)
    with pytest.raises(Killed):
        recover(model, tok, splits, mixture, config, checkpoint_dir=tmp_path / "b", progress=False, on_step=kill_at_5)
    assert json.loads((tmp_path / "b" / "trainer_state.json").read_text())["step"] == 4
    model, tok = load_model(tiny_dir)
    resumed, resumed_history = recover(model, tok, splits, mixture, config, checkpoint_dir=tmp_path / "b",
                                       resume=True, progress=False)
    for (name, a), (_, b) in zip(whole.mixture.state_dict().items(), resumed.mixture.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed_history["train_loss"] == whole_history["train_loss"]
    assert resumed_history["lr"] == whole_history["lr"]


def test_the_cosine_schedule_takes_every_rate_from_its_value_down_to_zero(tiny_dir, splits):
    model, tok = load_model(tiny_dir)
    mixture = MixtureConfig(n_experts=2, prompt_len=3, gate="mops", gate_layer=1)
    lm, history = recover(model, tok, splits, mixture, small(steps=4, lr=0.2, gate_lr=0.01, lr_schedule="cosine"),
                          progress=False)
    assert history["lr"] == pytest.approx([0.2, 0.1 * (1 + math.cos(math.pi / 4)), 0.1, 0.1 * (1 - math.cos(math.pi / 4))])
    # the gate's rate follows the same curve: apply the last step's schedule to fresh groups
    optimizer = torch.optim.AdamW(trainable_groups(lm, small(lr=0.3, gate_lr=0.01, lr_schedule="cosine")))
    schedule_lr(optimizer, small(lr_schedule="cosine"), 2, 4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.3 * 0.5, 0.01 * 0.5])
    model, tok = load_model(tiny_dir)
    _, constant = recover(model, tok, splits, mixture, small(steps=4, lr=0.2, gate_lr=0.01), progress=False)
    assert constant["lr"] == [0.2] * 4 and constant["train_loss"][0] == history["train_loss"][0]
    assert constant["train_loss"][1:] != history["train_loss"][1:]


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_and_the_run_records_it(tiny_dir, splits, monkeypatch,
                                                                                      native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert resolve_mixed_precision("auto", cpu) == ("bf16" if native else "no")
    assert [resolve_mixed_precision(v, cpu) for v in ("no", "bf16")] == ["no", "bf16"]
    model, tok = load_model(tiny_dir)
    mixture = MixtureConfig(n_experts=2, prompt_len=3, gate="mops", gate_layer=1)
    lm, history = recover(model, tok, splits, mixture, small(steps=2, mixed_precision="auto"), progress=False)
    _, full = recover(model, tok, splits, mixture, small(steps=2), progress=False)
    assert history["mixed_precision"] == ("bf16" if native else "no") and full["mixed_precision"] == "no"
    # before the first step both are float32 (gate pretraining and the lower layers never autocast)
    assert history["validation"][0] == full["validation"][0]
    assert (history["train_loss"][0] != full["train_loss"][0]) == native
    # the model handed back runs in float32: accelerate's autocast wrapper is off its forward
    # (with it on, a plain call would equal a call under bf16 autocast)
    b = pad_batch([encode_example(tok, r, 48) for r in splits["test"][:2]], tok.pad_token_id, side="right")
    args = (b["input_ids"], b["attention_mask"], b["gate_mask"], b["labels"])
    with torch.no_grad():
        plain = lm(*args, return_logits=False).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not torch.equal(lm(*args, return_logits=False).loss, plain)


def test_pretrained_gate_routes_held_out_categories_to_their_expert(tiny_dir, splits):
    model, tok = load_model(tiny_dir)
    K = 4
    lm, _ = recover(model, tok, splits, MixtureConfig(n_experts=K, prompt_len=2, gate="mops", gate_layer=2, inject_layer=1),
                    small(steps=1, gate_pretrain_steps=150, gate_pretrain_examples=400, gate_pretrain_lr=3e-2),
                    progress=False)
    test = splits["test"]
    targets = category_targets(test, K)  # same sorted categories as training: all 16 appear in both
    examples = [encode_example(tok, r, 96) for r in test]
    with torch.no_grad():
        weights = lm.mixture.gate.from_pooled(pooled_gate_inputs(lm, examples), lm.mixture.experts())
    hits = (weights.argmax(1) == torch.tensor(targets)).float().mean().item()
    assert hits > 2 / K  # chance is 1/K


def test_a_warmup_raises_every_rate_linearly_then_hands_over_to_the_schedule(tiny_dir, splits):
    model, tok = load_model(tiny_dir)
    mixture = MixtureConfig(n_experts=2, prompt_len=3, gate="mops", gate_layer=1)
    lm, history = recover(model, tok, splits, mixture, small(steps=4, lr=0.2, gate_lr=0.01, lr_warmup=2),
                          progress=False)
    assert history["lr"] == pytest.approx([0.1, 0.2, 0.2, 0.2])
    optimizer = torch.optim.AdamW(trainable_groups(lm, small(lr=0.2, gate_lr=0.01)))
    for step in range(8):  # warmup over 4 steps, under the cosine over 8: the two factors multiply
        schedule_lr(optimizer, small(lr_schedule="cosine", lr_warmup=4), step, 8)
        factor = min(1, (step + 1) / 4) * 0.5 * (1 + math.cos(math.pi * step / 8))
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2 * factor, 0.01 * factor])


BAD = [
    (["--experts", "0"], "--experts 0"),
    (["--prompt-len", "-2"], "--prompt-len -2"),
    (["--gate-layer", "7"], "--gate-layer 7: expected a layer in [0, 2]"),
    (["--inject-layer", "-1"], "--inject-layer -1"),
    (["--gate", "router"], "--gate 'router'"),
    (["--steps", "0"], "--steps 0"),
    (["--lora-lr", "0"], "--lora-lr 0.0: expected a positive learning rate"),
    (["--mixed-precision", "fp8"], "--mixed-precision 'fp8'"),
    (["--lr-schedule", "linear"], "--lr-schedule 'linear': expected one of constant, cosine"),
    (["--lr-warmup", "-1"], "--lr-warmup -1: expected 0 or more"),
    (["--max-len", "1"], "--max-len 1"),
    (["--prompt-len", "0"], "--prompt-len 0: nothing to train"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--distill", "1.2", "--teacher", "x"], "--distill 1.2: expected a weight from 0 to 1"),
    (["--distill", "0.5"], "--distill 0.5: distillation needs the dense model: pass --teacher"),
    (["--teacher", "x"], "--teacher: given without --distill"),
    (["--distill", "0.5", "--teacher", "/no/such/model"], "/no/such/model"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_recover_input_gets_one_line_errors(tmp_path, tiny_dir, capsys, argv, message):
    code = entry(["--base", tiny_dir, "--data", "dolly", "--limit-per-source", "20", "--out", str(tmp_path / "ad"),
                  "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_gate_pretraining_needs_categories(tmp_path, tiny_dir, capsys):
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(30)))
    code = entry(["--base", tiny_dir, "--data", f"{data}#instruction=q,response=a", "--out", str(tmp_path / "ad"),
                  "--steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "gate pretraining needs records of at least 2 categories" in err
    assert not (tmp_path / "ad").exists()


def test_a_base_that_is_not_a_causal_lm_is_refused(tmp_path, capsys):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1).save_pretrained(tmp_path / "t5")
    code = entry(["--base", str(tmp_path / "t5"), "--data", "dolly", "--out", str(tmp_path / "ad"), "--quiet"])
    assert code == 2 and "is not a causal LM" in capsys.readouterr().err


def test_mops_recover_cli_writes_a_loadable_adapter_and_resumes(tmp_path, tiny_dir, capsys):
    out = tmp_path / "ad"
    argv = ["--base", tiny_dir, "--data", "dolly", "--data", "natural-instructions", "--limit-per-source", "40",
            "--experts", "2", "--prompt-len", "3", "--steps", "3", "--eval-every", "3", "--eval-examples", "8",
            "--gate-pretrain-steps", "5", "--max-len", "96", "--out", str(out), "--quiet"]
    assert entry(argv) == 0
    stdout = capsys.readouterr().out
    assert "validation response ppl" in stdout
    config = json.loads((out / "mops_config.json").read_text())
    assert config["mixture"]["gate_layer"] == 1 and config["mixture"]["inject_layer"] == 1  # round(0.3 * 2)
    assert config["data"] == ["dolly", "natural-instructions"] and config["training"]["steps"] == 3
    history = json.loads((out / "history.json").read_text())
    assert history["train_loss"]
    snaps = json.loads((out / "gate_snapshots.json").read_text())
    assert snaps == history["gate_snapshots"] and len(snaps) == 4 and (out / "gate_heatmap.png").is_file()
    assert not checkpoint_dir_for(out).exists()
    assert mops.load(tiny_dir, out).mixture.config.n_experts == 2
    code = entry(argv[:-3] + ["--out", str(tmp_path / "other"), "--resume", "--quiet"])
    assert code == 2 and "--resume: no checkpoint" in capsys.readouterr().err


def test_a_mixture_composed_from_an_earlier_single_prompt_keeps_it_frozen(tmp_path, tiny_dir, capsys):
    common = ["--base", tiny_dir, "--data", "dolly", "--data", "natural-instructions", "--limit-per-source", "40",
              "--prompt-len", "3", "--steps", "2", "--eval-every", "2", "--eval-examples", "4", "--test-examples", "0",
              "--gate-pretrain-steps", "3", "--max-len", "96", "--quiet"]
    assert entry(common + ["--gate", "single", "--experts", "1", "--out", str(tmp_path / "source")]) == 0
    assert entry(common + ["--experts", "3", "--source-prompt", str(tmp_path / "source"), "--out", str(tmp_path / "mix")]) == 0
    source = mops.load(tiny_dir, tmp_path / "source").mixture.experts.weight[0]
    mixed = mops.load(tiny_dir, tmp_path / "mix").mixture.experts
    assert torch.equal(mixed.weight[0], source) and mixed.frozen.tolist() == [True, False, False]
    assert json.loads((tmp_path / "mix" / "mops_config.json").read_text())["source_prompts"] == [str(tmp_path / "source")]
    capsys.readouterr()
    code = entry(common + ["--experts", "2", "--prompt-len", "4", "--source-prompt", str(tmp_path / "source"),
                           "--out", str(tmp_path / "bad")])
    assert code == 2 and "this mixture needs m = 4, d = 64, l = 1" in capsys.readouterr().err


def test_a_left_checkpoint_is_never_overwritten_silently_and_resumes_only_with_its_settings(tmp_path, tiny_dir, capsys):
    out = tmp_path / "ad"
    argv = ["--base", tiny_dir, "--data", "dolly", "--limit-per-source", "40", "--experts", "2", "--prompt-len", "3",
            "--steps", "2", "--eval-examples", "4", "--test-examples", "0", "--gate-pretrain-steps", "2",
            "--max-len", "96", "--out", str(out), "--quiet"]
    model, tok = load_model(tiny_dir)
    splits = split_records(load_records(["dolly"], limit_per_source=40))
    recover(model, tok, splits, MixtureConfig(2, 3, gate_layer=1), small(steps=2), checkpoint_dir=checkpoint_dir_for(out),
            progress=False)  # leaves a checkpoint, as a killed run would
    assert entry(argv) == 2 and "pass --resume to continue it" in capsys.readouterr().err
    assert entry(argv + ["--resume", "--experts", "3"]) == 2
    assert "was made with other mixture, training;" in capsys.readouterr().err
    assert checkpoint_dir_for(out).is_dir() and not out.exists()
