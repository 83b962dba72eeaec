"""The lm-eval integration against independent references: lm-eval's own ``hf`` model (on the
bare model, and with PEFT prompt tuning for an l = 0, K = 1 adapter), the prompted model
called directly, lm-eval's own MMLU template; plus the gate's blindness to the choices of a
multiple-choice item and mops-eval's one-line errors."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from mops.eval import cli, task_data, task_files
from mops.eval.harness import MopsLM, window

from mops.adapter import save_adapter
from mops.cli_common import run_cli
from mops.injection import PromptedLM
from mops.mixture import Mixture, MixtureConfig
from mops.models import load_model

CONTEXTS = [
    "### Instruction:\nIs this review positive or negative?\n\n### Input:\nA gorgeous, witty film.\n\n### Response:\n",
    "The capital of France is",
    "Question: 2 + 2 =",
]
CHOICES = ["POS", "NEG", " Paris, of course", " 4"]
TEXT = "Robert Boulter is an English film, television and theatre actor. " * 12
GEN = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}


def ll_requests(contexts=CONTEXTS, choices=CHOICES):
    return [Instance("loglikelihood", {}, (c, k), i) for i, (c, k) in enumerate((c, k) for c in contexts for k in choices)]


def rolling_requests():
    return [Instance("loglikelihood_rolling", {}, (TEXT,), 0), Instance("loglikelihood_rolling", {}, (TEXT[:90],), 1)]


def gen_requests():
    return [Instance("generate_until", {}, (c, dict(GEN)), i) for i, c in enumerate(CONTEXTS)]


def assert_same_scores(ours: MopsLM, ref: HFLM, rel: float):
    for a, b in zip(ours.loglikelihood(ll_requests()), ref.loglikelihood(ll_requests())):
        assert a[0] == pytest.approx(b[0], rel=rel, abs=rel) and a[1] == b[1]
    for a, b in zip(ours.loglikelihood_rolling(rolling_requests()), ref.loglikelihood_rolling(rolling_requests())):
        assert a == pytest.approx(b, rel=rel)
    assert ours.generate_until(gen_requests()) == ref.generate_until(gen_requests())


def write_adapter(base_dir, folder, **mixture):
    """An adapter for ``base_dir`` with random (non-trivial) experts and gate."""
    model, _ = load_model(base_dir)
    config = MixtureConfig(**mixture).resolved(model.config.num_hidden_layers)
    K = config.n_prompts
    torch.manual_seed(0)
    init = torch.randn(K, config.prompt_len, model.config.hidden_size) * 0.3
    lm = PromptedLM(model, Mixture(config, model.config.hidden_size, init=init))
    for p in lm.mixture.parameters():  # a gate far from uniform, so that what it pools matters
        p.data.add_(torch.randn_like(p) * 0.5)
    save_adapter(lm, folder, base_name=str(base_dir))
    return lm


@pytest.fixture(scope="module")
def empty_adapter(tiny_dir, tmp_path_factory):
    """m = 0: the prompted path must then score exactly as the bare model."""
    folder = tmp_path_factory.mktemp("m0") / "adapter"
    write_adapter(tiny_dir, folder, n_experts=3, prompt_len=0, gate="mops", gate_layer=1, inject_layer=1)
    return str(folder)


@pytest.fixture(scope="module")
def gated_adapter(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gated") / "adapter"
    write_adapter(tiny_dir, folder, n_experts=3, prompt_len=4, gate="mops", combine="interpolate",
                  gate_layer=1, inject_layer=1)  # m = 4 prompt positions
    return str(folder)


# ----------------------------------------------------------------------------- the model


def test_without_adapter_mops_equals_lm_evals_hf_model(tiny_dir):
    ours = MopsLM(pretrained=tiny_dir, batch_size=2)
    ref = HFLM(pretrained=tiny_dir, dtype="float32", device="cpu", batch_size=2)
    assert ours.max_length == ref.max_length == 1024
    assert_same_scores(ours, ref, rel=1e-6)


def test_prompted_path_with_no_prompt_vectors_equals_hf_batching_and_truncation_included(tiny_dir, empty_adapter):
    ours = MopsLM(pretrained=tiny_dir, adapter=empty_adapter, batch_size=3, max_length=24)  # truncates the long ones
    ref = HFLM(pretrained=tiny_dir, dtype="float32", device="cpu", batch_size=1, max_length=24)
    assert ours.prompted is not None
    assert_same_scores(ours, ref, rel=1e-5)


def test_l0_single_prompt_adapter_equals_hf_with_the_peft_prompt_tuning_adapter(tiny_dir, tmp_path):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    m = 5
    lm = write_adapter(tiny_dir, tmp_path / "ours", n_experts=1, prompt_len=m, gate="single", gate_layer=0, inject_layer=0)
    peft = get_peft_model(copy.deepcopy(lm.base), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m))
    peft.prompt_encoder["default"].embedding.weight.data = lm.mixture.experts.weight.data[0].clone()
    peft.save_pretrained(tmp_path / "peft")
    ours = MopsLM(pretrained=tiny_dir, adapter=str(tmp_path / "ours"), batch_size=2, max_length=40)
    ref = HFLM(pretrained=tiny_dir, peft=str(tmp_path / "peft"), dtype="float32", device="cpu", batch_size=1, max_length=40)
    assert_same_scores(ours, ref, rel=1e-5)


def test_max_length_leaves_room_for_the_prompt(tiny_dir, gated_adapter):
    assert MopsLM(pretrained=tiny_dir, adapter=gated_adapter).max_length == 1024 - 4
    with pytest.raises(Exception, match="max_length=1022: with the adapter's 4 prompt positions"):
        MopsLM(pretrained=tiny_dir, adapter=gated_adapter, max_length=1022)


def gate_calls(lm: MopsLM) -> list[torch.Tensor]:
    """Every gate output of the real model, recorded as the mixture computes it."""
    seen = []
    mixture = lm.prompted.mixture
    compute = mixture.weights_from_pooled

    def recorded(pooled, batch):
        out = compute(pooled, batch)
        seen.append(out.detach().clone())
        return out

    mixture.weights_from_pooled = recorded
    return seen


def test_gate_weights_of_a_multiple_choice_item_do_not_depend_on_its_choices(tiny_dir, gated_adapter):
    lm = MopsLM(pretrained=tiny_dir, adapter=gated_adapter, batch_size=1)
    seen = gate_calls(lm)
    context = CONTEXTS[0]
    short = lm.loglikelihood([Instance("loglikelihood", {}, (context, k), i) for i, k in enumerate(["POS", "NEG"])])
    long = lm.loglikelihood([Instance("loglikelihood", {}, (context, k), i)
                             for i, k in enumerate(["POS", " this answer is much longer than the others", "NEG"])])
    assert len(seen) >= 3  # several forward passes, one gate each
    for w in seen:  # equal up to float rounding: the lower layers ran over inputs of different lengths
        torch.testing.assert_close(w, seen[0], rtol=1e-6, atol=1e-7)
    assert short[0][0] == pytest.approx(long[0][0], rel=1e-5) and short[1][0] == pytest.approx(long[2][0], rel=1e-5)
    # the control: a gate pooling the whole input (context + choice) would have moved
    ids = [lm.tok_encode(context + k) for k in ("POS", " this answer is much longer than the others")]
    with torch.no_grad():
        peeking = [lm.prompted(torch.tensor([i])).gate_weights for i in ids]
    assert not torch.allclose(peeking[0], peeking[1], atol=1e-4)


def test_gate_pools_exactly_the_context_tokens_of_each_request(tiny_dir, gated_adapter):
    """Two requests with the same model input but a different context/continuation split get
    different gates (no shared forward pass), each equal to the prompted model called directly."""
    lm = MopsLM(pretrained=tiny_dir, adapter=gated_adapter, batch_size=4)
    tokens = lm.tok_encode("one two three four five six")
    requests = [(None, tokens[:2], tokens[2:4]), (None, tokens[:3], tokens[3:4]), (None, tokens[:4], tokens[4:])]
    seen = gate_calls(lm)
    got = lm._loglikelihood_tokens(requests)
    assert len(seen) == 1 and seen[0].shape[0] == 3  # one batch of three distinct (input, gate) rows
    for (_, ctx, cont), (score, _) in zip(requests, got):
        inp, n_gate = window(ctx, cont, lm.max_length)
        assert n_gate == len(ctx)
        gate_mask = torch.tensor([[True] * n_gate + [False] * (len(inp) - n_gate)])
        with torch.no_grad():
            logits = lm.prompted(torch.tensor([inp]), None, gate_mask).logits[0].log_softmax(-1)
        expected = sum(logits[len(inp) - len(cont) + j, t].item() for j, t in enumerate(cont))
        assert score == pytest.approx(expected, rel=1e-5)
    assert not torch.allclose(seen[0][0], seen[0][1])


def test_bad_model_args_are_one_line_errors(tiny_dir, tiny_untied_dir, gated_adapter, tmp_path):
    from mops.errors import UserError

    with pytest.raises(UserError, match="no such folder"):
        MopsLM(pretrained=tiny_dir, adapter=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="was trained on"):
        MopsLM(pretrained=tiny_untied_dir, adapter=gated_adapter)


# ----------------------------------------------------------------------------- the tasks


def test_task_files_are_generated_from_the_data_and_up_to_date():
    assert task_files.main(["--check"]) == 0
    names = set(task_files.task_manager(include_defaults=False).all_tasks)
    subjects = task_data.mmlu_subjects()
    assert len(subjects) == 57
    for s in subjects:
        assert {f"mops_mmlu_{s}", f"mops_mmlu_5shot_{s}"} <= names
    assert {"mops_mmlu", "mops_mmlu_5shot", "mops_wikitext2", "mops_ni_mc", "mops_response"} <= names
    assert {f"mops_response_{c}" for c in task_data.heldout_categories()} <= names


def test_mmlu_task_uses_lm_evals_own_prompt_and_few_shot_settings():
    from lm_eval.tasks._yaml_loader import load_yaml

    theirs_dir = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    theirs = load_yaml(theirs_dir / "mmlu_high_school_physics.yaml", resolve_func=False)
    ours = load_yaml(task_files.tasks_dir() / "mmlu" / "mops_mmlu_5shot_high_school_physics.yaml", resolve_func=False)
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "fewshot_split", "fewshot_config", "description",
                "output_type", "test_split"):
        assert ours[key] == theirs[key], key
    assert ours["num_fewshot"] == 5
    docs = task_data.mmlu("high_school_physics")
    assert {k: len(v) for k, v in docs.items()} == {"test": 151, "validation": 17, "dev": 5}
    assert set(docs["test"][0]) == {"question", "subject", "choices", "answer"}


def test_wikitext_documents_cover_the_raw_test_file():
    pages = task_data.wikitext_pages("test")
    raw = (task_data.data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    assert len(pages) == 62 and pages[0].startswith(" = Robert Boulter = ")
    assert raw.startswith(" \n") and "\n".join(pages) == raw[len(" \n"):]  # only the leading blank line is left out


def test_classification_tasks_refuse_a_label_outside_their_label_set():
    from mops.errors import UserError

    docs = task_data.classification("task363_sst2_polarity_classification", ["POS", "NEG"])
    assert len(docs["test"]) > 0 and set(docs["test"]["gold"]) == {0, 1}
    with pytest.raises(UserError, match="not in the task's label set"):
        task_data.classification("task363_sst2_polarity_classification", ["POS"])


def test_our_tasks_score_the_same_through_mops_and_hf(tiny_dir):
    tasks = ["mops_wikitext2", "mops_ni_sst2", "mops_response_open_qa", "mops_mmlu_5shot_anatomy"]
    manager = task_files.task_manager(include_defaults=False)
    out = {}
    for model, args in (("hf", {"pretrained": tiny_dir, "dtype": "float32", "device": "cpu"}), ("mops", {"pretrained": tiny_dir})):
        out[model] = lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, task_manager=manager, limit=1,
                                             batch_size=2, log_samples=False)["results"]
    for t in tasks:
        metrics = {k: v for k, v in out["hf"][t].items() if k.endswith(",none") and isinstance(v, float)}
        assert metrics, t
        assert {k: out["mops"][t][k] for k in metrics} == pytest.approx(metrics, rel=1e-6), t


# ----------------------------------------------------------------------------- mops-eval


def test_mops_eval_writes_the_comparison_and_lm_evals_files(tiny_dir, empty_adapter, tmp_path):
    out = tmp_path / "eval"
    argv = ["--model", f"bare={tiny_dir}", "--model", f"adapted={tiny_dir},adapter={empty_adapter}",
            "--tasks", "mops_ni_sst2:2,mops_response", "--limit", "1", "--out", str(out), "--quiet"]
    assert run_cli(cli.main, argv) == 0
    comp = json.loads((out / "comparison.json").read_text())
    assert list(comp["rows"]) == ["bare", "adapted"]
    assert "mops_ni_sst2 acc" in comp["columns"]
    assert len([c for c in comp["columns"] if c.startswith("mops_response_")]) == len(task_data.heldout_categories())
    assert comp["samples"]["mops_ni_sst2"] == 2 and comp["samples"]["mops_response_open_qa"] == 1
    for label in ("bare", "adapted"):  # one lm-eval results file per distinct limit
        results = {}
        for f in sorted((out / "lm_eval").glob(f"{label}.*.json")):
            results.update(json.loads(f.read_text())["results"])
        for col, value in comp["rows"][label].items():
            task, metric = col.split(" ")
            assert value == results[task][f"{metric},none"]
    # m = 0: the adapted model scores as the bare one
    assert comp["rows"]["adapted"] == pytest.approx(comp["rows"]["bare"], rel=1e-5)
    table = (out / "comparison.md").read_text()
    assert table.startswith("| model | mops_ni_sst2 acc ↑ |") and "| adapted |" in table


@pytest.mark.parametrize("model,tasks,message", [
    ("x={tiny}", "mops_nope", "unknown task 'mops_nope'"),
    ("x=/nonexistent/model", "mops_ni_sst2", "/nonexistent/model"),
    ("x={tiny},adapter=/nonexistent/adapter", "mops_ni_sst2", "adapter '/nonexistent/adapter': no such folder"),
    ("x={untied},adapter={adapter}", "mops_ni_sst2", "was trained on"),
    ("x={tiny},colour=red", "mops_ni_sst2", "'colour=red': expected key=value"),
])
def test_mops_eval_bad_input_is_one_line_and_writes_nothing(model, tasks, message, tiny_dir, tiny_untied_dir,
                                                           gated_adapter, tmp_path, capsys):
    model = model.format(tiny=tiny_dir, untied=tiny_untied_dir, adapter=gated_adapter)
    out = tmp_path / "eval"
    argv = ["--model", model, "--tasks", tasks, "--limit", "1", "--out", str(out), "--quiet"]
    assert run_cli(cli.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_mops_eval_console_script_exits_non_zero_with_one_line(tmp_path):
    exe = Path(sys.executable).with_name("mops-eval")
    proc = subprocess.run([str(exe), "--model", "dense=smollm2-135m", "--tasks", "mmlu_nope", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown task 'mmlu_nope'" in proc.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- embedded


@pytest.mark.embedded
def test_embedded_mops_equals_hf_on_our_tasks_and_greedy_generation(embedded_dir):
    ours = MopsLM(pretrained="smollm2-135m", batch_size=2, max_length=256)
    ref = HFLM(pretrained=embedded_dir, dtype="float32", device="cpu", batch_size=2, max_length=256)
    gens = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), i)
            for i, c in enumerate(CONTEXTS)]
    assert ours.generate_until(gens) == ref.generate_until(gens)
    tasks = ["mops_wikitext2", "mops_mmlu_anatomy", "mops_ni_sst2"]
    manager = task_files.task_manager(include_defaults=False)
    r_ours = lm_eval.simple_evaluate(model=ours, tasks=tasks, task_manager=manager, limit=2, log_samples=False)["results"]
    r_ref = lm_eval.simple_evaluate(model=ref, tasks=tasks, task_manager=manager, limit=2, log_samples=False)["results"]
    for t in tasks:
        metrics = {k: v for k, v in r_ref[t].items() if k.endswith(",none") and isinstance(v, float)}
        assert {k: r_ours[t][k] for k in metrics} == pytest.approx(metrics, rel=1e-6), t
    assert math.isfinite(r_ours["mops_wikitext2"]["word_perplexity,none"])


def test_per_task_limits_and_bad_task_specs():
    from mops.errors import UserError

    assert cli.parse_tasks("a:2,b,c:0.5", 8) == [("a", 2), ("b", 8), ("c", 0.5)]
    assert cli.parse_tasks("a", None) == [("a", None)]
    for bad, message in (("a:x", "NAME:LIMIT"), ("a:0", "positive"), (",", "at least one")):
        with pytest.raises(UserError, match=message):
            cli.parse_tasks(bad, None)


@pytest.mark.embedded
def test_lm_evals_own_command_line_runs_the_embedded_default_through_the_shim(tmp_path):
    """``python -m mops.eval.lm_eval_cli`` is lm-eval's CLI with the model registered and our
    tasks included (a plain ``lm_eval --model mops`` cannot know the model: no plugin hook);
    ``pretrained=smollm2-135m`` names the embedded default; lm-eval's default device cuda:0
    falls back to the CPU here, as it does for ``hf``."""
    cmd = [sys.executable, "-m", "mops.eval.lm_eval_cli", "--model", "mops", "--model_args", "pretrained=smollm2-135m",
           "--tasks", "mops_ni_sst2", "--limit", "2", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # lm-eval prints the task under its alias, the Natural-Instructions task's own name
    assert "task363_sst2_polarity_classification" in proc.stdout and "acc" in proc.stdout
    (results,) = (tmp_path / "out").rglob("results_*.json")
    assert "acc,none" in json.loads(results.read_text())["results"]["mops_ni_sst2"]
