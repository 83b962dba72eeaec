"""mops-run end to end on a tiny model: the report, the stage cache (a rerun reuses every
stage, a changed recovery option reruns exactly what depends on it), reproducibility, the
trackers, and the HTML report in a real headless Chromium."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mops.data import encode_example
from mops.pipeline.cli import entry

RECIPE = """\
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
  training: {{steps: 4, batch_size: 2, eval_every: 2, eval_examples: 4, gate_pretrain_steps: 2, max_len: 512,
             checkpoint_every: 1}}
  snapshot_examples: 8
  methods:
    - name: mops
      lr: 0.1
      distill: 0.5                      # toward the dense model: its command needs --teacher
    - name: lora
    - name: none
evaluate:
  wikitext: {{seq_len: 64, windows: 4}}
  response: {{examples: 8}}
  tasks: [{{name: mops_ni_sst2, limit: 2}}]
  resamples: 200
"""
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def write_recipe(folder: Path, model: str, text: str = RECIPE) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(text.format(model=model, out=folder / "out"))
    return str(path)


def numbers(out: Path) -> list[dict]:
    """Every number of the report but the seconds (and where a run was resumed)."""
    rows = json.loads((out / "report.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k not in ("train_seconds", "resumed_from_step")} for r in rows]


def stage_folders(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "stages").glob("*/*") if not p.name.startswith(".")}


#: Every token sequence the reference run sent through the layers below the injection layer.
REFERENCE_LOWER_STATES: list[tuple[int, ...]] = []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir):
    """One uninterrupted run of the tiny recipe (its lower-layer computations counted)."""
    from mops.injection import PromptedLM

    folder = tmp_path_factory.mktemp("reference")
    path = write_recipe(folder, tiny_dir)
    lower_states = PromptedLM.lower_states

    def counted(self, sequences):
        if self.inject_layer > 0:  # a bare model's "lower layers" are its embeddings: nothing stored
            REFERENCE_LOWER_STATES.extend(tuple(s) for s in sequences)
        return lower_states(self, sequences)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PromptedLM, "lower_states", counted)
        assert entry([path, "--quiet"]) == 0
    return path, folder / "out"


def test_one_command_writes_a_report_with_every_model(reference):
    _, out = reference
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["dense", "magnitude-2of4", "magnitude-2of4/mops", "magnitude-2of4/lora"]
    assert [r["sparsity"] for r in rows] == [0.0, 0.5, 0.5, 0.5]  # LoRA stays unmerged, the base stays sparse
    for r in rows:
        for measure in ("wikitext2", "response"):
            assert r[measure]["low"] <= r[measure]["ppl"] <= r[measure]["high"]
        assert [(s["task"], s["metric"], s["n"]) for s in r["lm_eval"]] == [("mops_ni_sst2", "acc", 2)]
        assert r["lm_eval"][0]["stderr"] is not None
    pruned, mops, lora = rows[1:]
    assert pruned["reference"] == "dense" and mops["reference"] == lora["reference"] == "magnitude-2of4"
    assert mops["vs_reference"]["low"] <= mops["vs_reference"]["delta"] <= mops["vs_reference"]["high"]
    assert 0 < mops["trainable_params"] < lora["trainable_params"]
    for recovered in (mops, lora):  # the trained tensors were loaded back (untrained, both equal the pruned model)
        assert recovered["response"]["ppl"] != pruned["response"]["ppl"]
    md = (out / "report.md").read_text()
    assert "| magnitude-2of4/lora |" in md and "mops-run" in md and "```yaml" in md
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / image).is_file(), image
    assert "## Gate weights per category: magnitude-2of4/mops" in md  # a gate: its heatmap; LoRA has none
    html = (out / "report.html").read_text()
    assert html.count("<img") == len(re.findall(r"!\[", md)) and 'src="data:image/png;base64,' in html
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)  # nothing outside the file


def test_each_eval_says_where_its_seconds_went(reference):
    _, out = reference
    evals = [json.loads(p.read_text()) for p in (out / "stages" / "eval").glob("*/eval.json")]
    assert len(evals) == 4
    for e in evals:
        parts = e["seconds_by_part"]
        assert list(parts) == ["load", "wikitext2", "response", "lm_eval"] and min(parts.values()) > 0
        assert sum(parts.values()) == pytest.approx(e["seconds"], abs=0.05)


def test_the_pruned_model_and_adapters_have_names_a_person_can_type(reference):
    _, out = reference
    import mops

    lm = mops.load(out / "pruned" / "magnitude-2of4", out / "adapters" / "magnitude-2of4-mops")
    assert lm.mixture is not None and (out / "adapters" / "magnitude-2of4-lora" / "mops_config.json").is_file()
    assert not (out / "pruned" / "magnitude-2of4").resolve().is_relative_to(out / "pruned")  # a link into stages/


def test_a_second_run_reuses_every_stage_in_seconds(reference, capsys):
    path, out = reference
    before, report = stage_folders(out), (out / "report.md").read_text()
    started = time.perf_counter()
    assert entry([path, "--quiet"]) == 0
    seconds = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert "0 to run, 8 reused" in printed and "| magnitude-2of4/mops |" in printed
    assert stage_folders(out) == before and (out / "report.md").read_text() == report
    assert seconds < 30, seconds


def test_dry_run_prints_the_plan_and_writes_nothing(reference, tmp_path, capsys):
    path, out = reference
    before = stage_folders(out)
    assert entry([path, "--dry-run", "--out", str(tmp_path / "fresh")]) == 0
    printed = capsys.readouterr().out
    assert "8 to run, 0 reused" in printed and "nothing was run (--dry-run)" in printed
    assert re.search(r"recover\s+magnitude-2of4/mops\s+[0-9a-f]{12}\s+run", printed)
    assert not (tmp_path / "fresh").exists()
    assert entry([path, "--dry-run"]) == 0
    assert "0 to run, 8 reused" in capsys.readouterr().out
    assert stage_folders(out) == before


def test_the_same_recipe_run_again_in_a_new_process_gives_the_same_numbers(reference, tmp_path):
    path, out = reference
    again = tmp_path / "again"
    done = subprocess.run([sys.executable, "-m", "mops.pipeline.cli", path, "--out", str(again), "--quiet"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert numbers(again) == numbers(out)  # bitwise: same machine, same seed, same threads


def test_changing_one_recovery_option_reruns_exactly_the_dependent_stages(reference, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, out = reference
    work = tmp_path / "changed"
    shutil.copytree(out, work / "out")
    # the option changed: bfloat16 autocast for that one method
    recipe = Path(path).read_text().replace(str(out), str(work / "out")).replace(
        "lr: 0.1", "lr: 0.1\n      mixed_precision: bf16")
    (work / "recipe.yaml").write_text(recipe)
    before = stage_folders(work / "out")
    assert entry([str(work / "recipe.yaml"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    runs = re.findall(r"^\s+(\w+)\s+(\S+)\s+[0-9a-f]{12}\s+run$", plan, re.M)
    assert runs == [("recover", "magnitude-2of4/mops"), ("eval", "magnitude-2of4/mops"), ("report", "report")], plan
    assert entry([str(work / "recipe.yaml"), "--quiet", "--report-to", "tensorboard"]) == 0
    after = stage_folders(work / "out")
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that was there was touched
    assert sorted(k.split("/")[1] for k in set(after) - set(before)) == ["eval", "recover", "report"]
    rows = {r["label"]: r for r in numbers(work / "out")}
    old = {r["label"]: r for r in numbers(out)}
    for label in ("dense", "magnitude-2of4", "magnitude-2of4/lora"):
        assert rows[label]["response"] == old[label]["response"]
    assert rows["magnitude-2of4/mops"]["stage_key"] != old["magnitude-2of4/mops"]["stage_key"]
    assert (rows["magnitude-2of4/mops"]["mixed_precision"], old["magnitude-2of4/mops"]["mixed_precision"]) == ("bf16", "no")
    assert "- Trained under mixed-precision autocast: magnitude-2of4/mops (bf16);" in (work / "out" / "report.md").read_text()
    assert "mixed-precision autocast" not in (out / "report.md").read_text()

    # the retrained stage's curves, read back with TensorBoard's own reader
    runs_dir = list((work / "out" / "trackers" / "tensorboard").iterdir())
    assert len(runs_dir) == 1 and runs_dir[0].name.startswith("magnitude-2of4_mops-")
    events = EventAccumulator(str(runs_dir[0]))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("validation/ppl")] == [0, 2, 4]
    retrained = next(k for k in set(after) - set(before) if k.startswith("stages/recover/"))
    history = json.loads((work / "out" / retrained / "adapter" / "history.json").read_text())
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(history["train_loss"])
    assert {"gate/expert_0_weight", "gate/expert_1_weight"} <= set(scalars)
    weights = [events.Scalars(f"gate/expert_{k}_weight")[0].value for k in (0, 1)]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5)  # a soft gate's weights over the experts


def test_the_recovered_models_eval_reads_the_held_out_states_its_recover_stage_computed(reference):
    """The gate snapshots ran the 8 held-out examples through the layers below l; the eval of the
    recovered model takes their states from the run's store, and scores what a fresh store scores."""
    from mops.adapter import load
    from mops.eval.perplexity import response_perplexity
    from mops.models import load_model
    from mops.pipeline.recipe import load_recipe
    from mops.pipeline.world import check_world

    path, out = reference
    test = check_world(load_recipe(path)[0]).test_records(8)
    model, tokenizer = load_model(out / "pruned" / "magnitude-2of4")
    held_out = {tuple(encode_example(tokenizer, r).input_ids) for r in test}
    computed = REFERENCE_LOWER_STATES
    assert held_out <= set(computed)  # the snapshots ran them (max_len 512: encoded as the eval encodes them)
    twice = len(computed) - len(set(computed))
    assert twice == 0, f"{twice} examples ran through the lower layers twice"
    saved = next(e for e in map(json.loads, map(Path.read_text, out.glob("stages/eval/*/eval.json")))
                 if e["label"] == "magnitude-2of4/mops")
    lm = load(model, out / "adapters" / "magnitude-2of4-mops")
    fresh = response_perplexity(lm, tokenizer, test, progress=False)  # no store: every state computed anew
    assert fresh["per_example"] == saved["response"]["per_example"]  # bitwise


def test_the_reports_commands_reproduce_the_prune_and_recover_stages(reference, tmp_path, monkeypatch, capsys,
                                                                      tiny_dir):
    import shlex

    from safetensors.torch import load_file

    from mops.prune.cli import entry as prune
    from mops.recover_cli import entry as mops_recover

    _, out = reference
    md = (out / "report.md").read_text()
    block = md.split("## Reproduce", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = dict(zip(block.splitlines()[::2], block.splitlines()[1::2]))
    monkeypatch.chdir(tmp_path)  # the commands write under repro/
    argv = shlex.split(commands["# prune magnitude-2of4"])
    assert argv[0] == "prune" and prune(argv[1:] + ["--quiet"]) == 0
    pruned = next(out.glob("stages/prune/*/checkpoint"))
    assert load_file(tmp_path / "repro/prune-magnitude-2of4/model.safetensors").keys() == \
        load_file(pruned / "model.safetensors").keys()
    for name, tensor in load_file(pruned / "model.safetensors").items():
        assert load_file(tmp_path / "repro/prune-magnitude-2of4/model.safetensors")[name].equal(tensor), name
    argv = shlex.split(commands["# recover magnitude-2of4/mops"].split("  #")[0])
    assert argv[0] == "mops-recover" and mops_recover(argv[1:] + ["--quiet"]) == 0
    ours = next(p for p in out.glob("stages/recover/*/adapter") if '"method": "mops"' in (p / "mops_config.json").read_text())
    theirs = load_file(tmp_path / "repro/recover-magnitude-2of4-mops/mops_model.safetensors")
    assert all(theirs[k].equal(v) for k, v in load_file(ours / "mops_model.safetensors").items())
    assert "- Trained toward the dense model too (distillation, the KL's weight in the loss): magnitude-2of4/mops (0.5)." in md
    assert "mops-run only" not in commands["# recover magnitude-2of4/mops"]
    assert argv[argv.index("--distill") + 1] == "0.5" and argv[argv.index("--teacher") + 1] == tiny_dir
    saved = json.loads((tmp_path / "repro/recover-magnitude-2of4-mops/mops_config.json").read_text())
    assert saved["teacher"] == tiny_dir and saved["training"]["distill"] == 0.5  # the adapter says what it learned from
    assert commands["# recover magnitude-2of4/lora"].startswith("# LoRA lives inside the base")
    capsys.readouterr()


def test_the_html_report_loads_every_image_without_errors_in_headless_chromium(reference, tmp_path):
    _, out = reference
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: bash scripts/setup.sh installs Debian's chromium"
    with DevTools(tmp_path / "profile") as browser:
        page = browser.open((out / "report.html").resolve().as_uri())
        images = browser.evaluate(page, "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        shot = browser.screenshot(page)
        errors = browser.errors()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "pipeline_report.png").write_bytes(shot)
    assert len(images) == 4 and all(complete and width > 0 for _, complete, width in images), images
    assert errors == []
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- a small DevTools client

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class DevTools:
    """Chromium driven through the DevTools protocol over ``--remote-debugging-pipe`` (fd 3 in,
    fd 4 out, NUL-terminated JSON): no port, no extra package, and never a downloaded browser."""

    def __init__(self, profile: Path):
        import fcntl

        profile.mkdir(parents=True)
        to_chromium, self._out = os.pipe()
        self._in, from_chromium = os.pipe()

        def wire():  # in the child: the pipe ends at fds 3 and 4, where Chromium looks for them
            a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chromium, from_chromium))
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log = open(profile.parent / "chromium.log", "w")
        self.proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                      "about:blank"], pass_fds=(3, 4), preexec_fn=wire, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log)
        os.close(to_chromium)
        os.close(from_chromium)
        self._buffer, self._id, self.events = b"", 0, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._in)
        os.close(self._out)
        self.log.close()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            if not select.select([self._in], [], [], max(0.0, deadline - time.time()))[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> str:
        """A new tab on ``url``, once its load event fired; returns the tab's session."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        deadline = time.time() + 60
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session for e in self.events):
            self.events.append(self._read(deadline))
        return session

    def evaluate(self, session: str, expression: str):
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                         session=session)["result"]["value"]

    def screenshot(self, session: str) -> bytes:
        size = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
            "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}, session=session)
        return base64.b64decode(shot["data"])

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (a failed resource load is one)."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                out.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(params["entry"].get("text", ""))
        return out
