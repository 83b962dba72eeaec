"""mops-run's parts on their own: the measures behind the report, YAML 1.2, the MLflow
tracker fed by a real training run, and the import boundaries (the stages never import the
pipeline, the pipeline never runs a command line, and no command line imports another in a
circle)."""

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mops.errors import UserError
from mops.eval.bootstrap import recovered_share
from mops.pipeline.measures import ppl_interval, within_stderr
from mops.pipeline.yaml12 import load_yaml

ROOT = Path(__file__).resolve().parents[1]
#: import name -> folder, as pyproject.toml maps them
PACKAGES = {"mops": ROOT / "mops", "mops.prune": ROOT / "prune", "mops.eval": ROOT / "eval",
            "mops.kernels": ROOT / "kernels"}
CLI_MODULES = {"mops.recover_cli", "mops.federated.cli", "mops.prune.cli", "mops.eval.cli", "mops.eval.lm_eval_cli",
               "mops.pipeline.cli"}


def test_per_window_wikitext_sums_to_the_protocols_perplexity(tiny_dir):
    from mops.eval.perplexity import wikitext_perplexity
    from mops.models import load_model

    model, tokenizer = load_model(tiny_dir)
    result = wikitext_perplexity(model, tokenizer, 64, 3, progress=False)
    assert len(result["per_window"]) == 3 and result["tokens"] == 3 * 63
    assert result["ppl"] == math.exp(sum(result["per_window"]) / result["tokens"])


def test_perplexity_interval_brackets_the_token_weighted_perplexity():
    per_example = {"nll": [2.0, 9.0, 4.0, 30.0], "tokens": [1, 3, 2, 10]}
    r = ppl_interval(per_example, resamples=500, seed=0)
    assert r["ppl"] == pytest.approx(math.exp(45 / 16))
    assert r["low"] < r["ppl"] < r["high"]
    assert ppl_interval(per_example, resamples=500, seed=0) == r  # seeded


def test_recovered_share_and_the_stderr_rule():
    assert recovered_share(10.0, 40.0, 20.0) == pytest.approx(0.5)
    assert recovered_share(10.0, 40.0, 40.0) == 0 and recovered_share(10.0, 40.0, 10.0) == 1
    assert recovered_share(10.0, 9.0, 9.5) is None  # pruning did no damage to recover
    assert within_stderr(0.50, 0.03, 0.54, 0.03) and not within_stderr(0.50, 0.01, 0.54, 0.01)
    assert within_stderr(0.5, None, 0.6, 0.01) is None


def test_recipes_are_read_as_yaml_1_2_and_a_key_given_twice_is_refused():
    data = load_yaml("pattern: 2:4\nlr: 3e-3\ngate: on\nsteps: 40\nwindows: null\nx: -.inf\n", "r.yaml")
    assert data == {"pattern": "2:4", "lr": 0.003, "gate": "on", "steps": 40, "windows": None, "x": -math.inf}
    assert math.isnan(load_yaml("y: .nan", "r.yaml")["y"])
    with pytest.raises(UserError, match=r"r.yaml: line 3, column 1: key 'steps' is given twice \(first on line 1\)"):
        load_yaml("steps: 1\nlr: 2\nsteps: 3\n", "r.yaml")
    with pytest.raises(UserError, match=r"^r.yaml: line 2, column 2: expected ',' or ']'"):
        load_yaml("a: [1, 2\nb: 3\n", "r.yaml")


@dataclass
class FakeStage:  # what make_tracker reads of a stage: its label, key and settings
    label: str = "2of4/mops"
    short: str = "0123456789ab"
    settings: dict = field(default_factory=lambda: {"training": {"lr": 0.03, "top_k": None}, "method": "mops"})


def test_mlflow_tracker_gets_every_step_of_a_real_training_run(tmp_path, tiny_dir):
    from mlflow.tracking import MlflowClient

    from mops.data import load_records, split_records
    from mops.mixture import MixtureConfig
    from mops.models import load_model
    from mops.pipeline.trackers import StepLogger, make_tracker
    from mops.train import TrainConfig, recover

    model, tokenizer = load_model(tiny_dir)
    splits = split_records(load_records(["dolly", "natural-instructions"], 24), 0)
    tracker = make_tracker("mlflow", tmp_path, FakeStage())
    logger = StepLogger([tracker])
    _, history = recover(model, tokenizer, splits, MixtureConfig(2, 2), TrainConfig(
        steps=3, batch_size=2, eval_every=2, eval_examples=4, gate_pretrain_steps=1, max_len=64), progress=False,
        on_step=logger)
    logger.finish()
    assert (tmp_path / "trackers" / "mlflow" / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'trackers' / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(tracker.active_run.info.run_id)
    assert run.info.run_name == "2of4_mops-0123456789ab" and run.data.params["training/lr"] == "0.03"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in loss] == [(i + 1, pytest.approx(v)) for i, v in enumerate(history["train_loss"])]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "validation/ppl")] == [0, 2, 3]
    assert len(client.get_metric_history(run.info.run_id, "gate/expert_1_weight")) == 3


# ----------------------------------------------------------------------------- import boundaries


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if package == "mops" and parts and parts[0] in ("prune", "eval", "kernels"):
                continue
            out[".".join([package, *parts])] = path
    return out


def imported(path: Path, name: str, known) -> set[str]:
    """Every module of ours that ``path`` imports, at the top or inside a function."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known} - {name}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_command_line_and_no_pipeline_module_is_in_an_import_circle():
    known = modules()
    graph = {name: imported(path, name, known) for name, path in known.items()}
    assert CLI_MODULES <= set(known)
    for component in cycles(graph):
        ours = {m for m in component if m in CLI_MODULES or m.startswith("mops.pipeline")}
        assert not ours, f"import circle through {sorted(component)}"


def test_the_stages_never_import_the_pipeline_and_it_never_runs_their_command_lines():
    known = modules()
    for name, path in known.items():
        if not name.startswith("mops.pipeline"):
            assert not any(m.startswith("mops.pipeline") for m in imported(path, name, known)), name
    for name, path in known.items():
        if not name.startswith("mops.pipeline"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert "subprocess" not in {a.name for a in node.names}, name
            elif isinstance(node, ast.ImportFrom):
                assert node.module != "subprocess", name
                if node.module in CLI_MODULES - {"mops.pipeline.cli"}:  # their functions yes, their command line no
                    assert not {a.name for a in node.names} & {"main", "entry"}, (name, node.module)
            elif isinstance(node, ast.Attribute):
                assert node.attr not in ("system", "Popen", "execv", "execvp"), name
