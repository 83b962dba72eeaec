"""mops-run's recipe: every kind of bad recipe is one line naming the key path, the bad value
and what is accepted, exit code 2, and nothing written; good values mean what YAML 1.2 says
and the stages' own defaults fill what a recipe leaves out."""

import dataclasses
import os

import pytest

from mops.baselines import TRAIN_KEYS
from mops.mixture import MixtureConfig
from mops.pipeline.cli import entry
from mops.pipeline.recipe import MethodEntry, PruneEntry, Training, load_recipe
from mops.prune.config import PruneConfig
from mops.train import TrainConfig

BASE = """\
model: {model}
out: {out}
data:
  sources: [dolly, natural-instructions]
  limit_per_source: 48
prune:
  - method: magnitude
    pattern: 2:4
recover:
  budget: {{n_experts: 2, prompt_len: 2}}
  training:
    steps: 2
    lr: 3e-2
  methods:
    - name: mops
    - name: prompt
      lr: 0.3
    - name: uniform
evaluate:
  wikitext: {{seq_len: 64, windows: 2}}
  response: {{examples: 4}}
"""


def recipe(tmp_path, tiny_dir, changes=()) -> str:
    """The base recipe with each ``(old, new)`` text replacement made once."""
    body = BASE.format(model=tiny_dir, out=tmp_path / "out")
    for old, new in changes:
        assert old in body, old
        body = body.replace(old, new, 1)
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    return str(path)


def run(capsys, *argv):
    code = entry(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, tmp_path, argv, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and message in err, err
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no out folder


BAD = [
    # unknown key
    ([("model:", "modle:")], "modle: unknown key (did you mean 'model'?); accepted here: data, device"),
    ([("steps: 2", "stepz: 2")], "recover.training.stepz: unknown key (did you mean 'steps'?)"),
    # wrong type
    ([("steps: 2", "steps: many")], "recover.training.steps: 'many' is not a whole number"),
    ([("steps: 2", "steps: 2.5")], "recover.training.steps: 2.5 is not a whole number"),
    ([("limit_per_source: 48", "limit_per_source: [48]")], "data.limit_per_source: [48] is not a whole number"),
    ([("  - method: magnitude\n    pattern: 2:4", "  method: magnitude")],
     "prune: {'method': 'magnitude'} is not a list; expected a list of pruning settings"),
    # a value out of range or not among the accepted words
    ([("steps: 2", "steps: 0")], "recover.training.steps: 0 is not at least 1"),
    ([("lr: 3e-2", "lr: .inf")], "recover.training.lr: inf is not a finite number"),
    ([("pattern: 2:4", "sparsity: 1.2")], "prune[0].sparsity: 1.2 is not less than 1"),
    ([("- name: uniform", "- {name: mops, label: mops-g, gate: mopz}")],
     "recover.methods[2].gate: 'mopz' is not one of mops, attempt, uniform, single"),
    ([("- name: mops", "- {name: mops, combine: mix}")],
     "recover.methods[0].combine: 'mix' is not one of interpolate, attention"),
    ([("steps: 2", "steps: 2\n    lr_schedule: linear")],
     "recover.training.lr_schedule: 'linear' is not one of constant, cosine"),
    ([("- name: mops", "- {name: mops, distill: 1.5}")], "recover.methods[0].distill: 1.5 is not at most 1"),
    # unknown method
    ([("- name: mops", "- name: mopps")],
     "recover.methods[0].name: 'mopps' is not one of none, prompt, prompt-equal, uniform, attempt, lora, lora-equal, mops"),
    ([("method: magnitude", "method: obs")], "prune[0].method: 'obs' is not one of sparsegpt, wanda, magnitude"),
    # a key the method does not have, or two entries of one name
    ([("- name: uniform", "- {name: uniform, gate: mops}")],
     "recover.methods[2].gate: 'mops' cannot be set: the gate of 'uniform' is what makes it that method"),
    ([("- name: uniform", "- {name: lora, n_experts: 2}")],
     "recover.methods[2].n_experts: 2 cannot be set: a lora method has no mixture"),
    ([("- name: uniform", "- name: mops")], "recover.methods[2].name: 'mops' names two entries; give each its own label"),
    # missing required keys, model or data
    ([("model: ", "# model: ")], "model: missing; required: a checkpoint folder, a .gguf file, or smollm2-135m"),
    ([("model: ", "model: /no/such/model #")], "model: '/no/such/model': no such file or folder; expected an embedded name"),
    ([("[dolly, natural-instructions]", "[dolly, missing.jsonl]")],
     "data.sources[1]: data file 'missing.jsonl' does not exist; expected a named source"),
    ([("[dolly, natural-instructions]", "[dolly, dollie]")],
     "data.sources[1]: data source 'dollie': unknown; expected a named source (dolly, natural-instructions"),
    # impossible patterns
    ([("pattern: 2:4", "pattern: 5:4")], "prune[0].pattern: '5:4' is not N:M with 0 < N < M"),
    ([("pattern: 2:4", "pattern: 3:7")],
     "prune[0].pattern: '3:7' does not fit this model: M = 7 does not divide the input width 64 of q/k/v/gate/up_proj"),
    ([("pattern: 2:4", "pattern: 2:4\n    sparsity: 0.5")],
     "prune[0]: both sparsity 0.5 and pattern '2:4'; give exactly one of sparsity"),
    # a mixture that does not fit the model
    ([("- name: mops", "- {name: mops, gate_layer: 5}")],
     "recover.methods[0].gate_layer: 5 is not a layer in [0, 2] of this 2-layer model"),
    ([("- name: mops", "- {name: mops, gate: single}")],
     "recover.methods[0]: gate single is one prompt: use n_experts 1 (got 2)"),
    # evaluation
    ([("  response: {examples: 4}", "  response: {examples: 4}\n  tasks: [{name: mops_nope, limit: 2}]")],
     "evaluate.tasks[0].name: 'mops_nope' is not a task; ours: mops_mmlu, "),
    ([("seq_len: 64", "seq_len: 4096")], "evaluate.wikitext.seq_len: 4096 is more than the model's 1024 positions"),
    # YAML itself
    ([("  methods:", "  methods: [")], "recipe.yaml: line"),
    ([("    steps: 2", "    steps: 2\n    steps: 3")], "key 'steps' is given twice (first on line"),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[f"{i}-" + m.split(":")[0] for i, (_, m) in enumerate(BAD)])
def test_a_bad_recipe_is_one_line_and_exit_2_with_nothing_written(tmp_path, tiny_dir, capsys, changes, message):
    path = recipe(tmp_path, tiny_dir, changes)
    assert_refused(capsys, tmp_path, [path], message)
    assert_refused(capsys, tmp_path, [path, "--dry-run"], message)


def test_bad_data_folder_recipe_file_option_and_output_folder(tmp_path, tiny_dir, capsys, monkeypatch):
    path = recipe(tmp_path, tiny_dir)
    assert_refused(capsys, tmp_path, [str(tmp_path / "nope.yaml")], "recipe '" + str(tmp_path / "nope.yaml")
                   + "': no such file; expected a YAML file")
    assert_refused(capsys, tmp_path, [path, "--report-to", "wandb"],
                   "--report-to 'wandb': expected one of none, tensorboard, mlflow")
    monkeypatch.setenv("MOPS_DATA_DIR", str(tmp_path / "no-data"))
    assert_refused(capsys, tmp_path, [path], "data.sources[0]: source 'dolly': no files dolly-15k-subset.jsonl under")
    monkeypatch.delenv("MOPS_DATA_DIR")
    (tmp_path / "file").write_text("x")
    assert_refused(capsys, tmp_path, [path, "--out", str(tmp_path / "file")],
                   f"out: '{tmp_path / 'file'}' is a file; expected a folder path")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "model.bin").write_text("x")
    assert_refused(capsys, tmp_path, [path, "--out", str(tmp_path / "theirs")],
                   f"out: '{tmp_path / 'theirs'}' holds files mops-run did not write; choose a new or empty folder")
    assert os.listdir(tmp_path / "theirs") == ["model.bin"]


def test_values_mean_what_yaml_1_2_says(tmp_path, tiny_dir):
    recipe_obj, _ = load_recipe(recipe(tmp_path, tiny_dir))
    assert recipe_obj.prune[0].pattern == "2:4"  # YAML 1.1 would read 2:4 as the integer 124
    assert recipe_obj.recover.training.lr == 0.03  # and 3e-2 as a string
    assert recipe_obj.prune[0].name == "magnitude-2of4"
    assert [m.title for m in recipe_obj.recover.methods] == ["mops", "prompt", "uniform"]


def test_the_recipe_keys_are_the_stages_dataclass_fields():
    """A field added to PruneConfig, MixtureConfig or TrainConfig is a recipe key at once."""
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    assert set(PruneEntry.model_fields) == names(PruneConfig) - {"seed"} | {"label"}
    assert set(Training.model_fields) == names(TrainConfig) - {"seed"}
    assert set(MethodEntry.model_fields) == names(MixtureConfig) | set(TRAIN_KEYS) | {"name", "label"}


def test_left_out_keys_take_the_dataclass_defaults_read_when_the_run_starts(tmp_path, tiny_dir):
    from mops.pipeline.plan import build_plan
    from mops.pipeline.world import check_world

    recipe_obj, text = load_recipe(recipe(tmp_path, tiny_dir))
    stages = build_plan(check_world(recipe_obj), text)
    recover = {s.label: s for s in stages if s.kind == "recover"}
    mops, prompt = recover["magnitude-2of4/mops"], recover["magnitude-2of4/prompt"]
    assert mops.settings["training"] == dataclasses.asdict(TrainConfig(steps=2, lr=0.03, seed=0))
    assert prompt.settings["training"] == dataclasses.asdict(TrainConfig(steps=2, lr=0.3, seed=0))
    assert mops.settings["mixture"] == dataclasses.asdict(MixtureConfig(n_experts=2, prompt_len=2))
    prune = next(s for s in stages if s.kind == "prune")
    assert prune.settings["config"] == PruneConfig(method="magnitude", pattern="2:4").to_dict()
