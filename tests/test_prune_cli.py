"""The ``prune`` command line: a real run on a tiny model, and every bad input refused
with one line naming the bad value, a non-zero exit, and nothing written or damaged."""

import json

import pytest

from mops.prune.cli import entry


def run(capsys, *argv):
    code = entry(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_cli_writes_checkpoint_report_and_prints_perplexities(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "--model", tiny_dir, "--method", "wanda", "--pattern", "2:4", "--calib-samples", "8",
                          "--seq-len", "64", "--out", str(out), "--eval", "--eval-windows", "2", "--eval-examples", "16",
                          "--quiet")
    assert code == 0
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["nm_compliance"] == 1.0
    assert report["eval"]["dense"]["wikitext2"]["windows"] == 2
    assert report["eval"]["pruned"]["response"]["examples"] == 16
    assert "dense" in stdout and "pruned" in stdout and "2:4 compliance: 1.0000" in stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


BAD = [
    (["--method", "magnitude", "--pattern", "5:4"], "--pattern '5:4'"),
    (["--method", "magnitude", "--pattern", "0:4"], "--pattern '0:4'"),
    (["--method", "magnitude", "--pattern", "2:5"], "M=5 does not divide"),
    (["--method", "magnitude", "--sparsity", "1.2"], "--sparsity 1.2"),
    (["--method", "magnitude", "--sparsity", "0"], "--sparsity 0"),
    (["--method", "magnitude", "--sparsity", "lots"], "--sparsity 'lots'"),
    (["--method", "magnitude", "--sparsity", "0.5", "--pattern", "2:4"], "exactly one"),
    (["--method", "magnitude"], "exactly one"),
    (["--method", "obs", "--sparsity", "0.5"], "--method 'obs'"),
    (["--method", "sparsegpt", "--pattern", "2:4", "--calib-samples", "100000", "--seq-len", "64"], "fewer than --calib-samples 100000"),
    (["--method", "sparsegpt", "--pattern", "2:4", "--calib", "nosuchsource"], "data source 'nosuchsource'"),
    (["--method", "magnitude", "--pattern", "2:4", "--calib-samples", "0"], "--calib-samples 0"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_gets_one_line_error_and_writes_nothing(tmp_path, tiny_dir, capsys, argv, message):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--model", tiny_dir, "--out", str(out), "--quiet", *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model,message", [
    ("no/such/path", "no such file or folder"),
    ("gpt-5-nano", "no such file or folder"),
])
def test_unknown_models_are_refused_with_what_is_accepted(tmp_path, capsys, model, message):
    code, _, err = run(capsys, "--model", model, "--method", "magnitude", "--pattern", "2:4", "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and "smollm2-135m" in err
    assert len(err.strip().splitlines()) == 1


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM, T5Config

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    code, _, err = run(capsys, "--model", str(tmp_path / "bert"), "--method", "magnitude", "--pattern", "2:4",
                       "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2 and "model_type 'bert') is not a Llama-family causal LM" in err
    T5Config(d_model=32, num_layers=1).save_pretrained(tmp_path / "t5")
    code, _, err = run(capsys, "--model", str(tmp_path / "t5"), "--method", "magnitude", "--pattern", "2:4",
                       "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2 and "model_type 't5' is not a causal LM" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_without_force_and_left_intact(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, _, err = run(capsys, "--model", tiny_dir, "--method", "magnitude", "--pattern", "2:4", "--out", str(out), "--quiet")
    assert code == 2 and "--force" in err
    assert (out / "config.json").read_text() == "{}"


def test_failed_forced_run_does_not_damage_what_was_there(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, _, _ = run(capsys, "--model", tiny_dir, "--method", "magnitude", "--pattern", "2:5", "--out", str(out),
                     "--force", "--quiet")
    assert code == 2
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_an_existing_output(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, _ = run(capsys, "--model", tiny_dir, "--method", "magnitude", "--sparsity", "0.8", "--out", str(out),
                     "--force", "--quiet")
    assert code == 0
    assert not (out / "stale.txt").exists() and (out / "sparsity_report.json").is_file()
