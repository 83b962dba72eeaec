"""MoPs adapters on disk, in PEFT's habits: ``mops_config.json`` + ``mops_model.safetensors``.

The config records the mixture (K, m, g, l, gate and combine), the base model's name and
a hash of its weights, and the training settings; loading onto a base whose weights hash
differently is refused, since prompts are only meaningful for the model they were
trained on (a dense and a pruned checkpoint are different bases).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mops.errors import UserError
from mops.gate_analysis import save_gate_analysis
from mops.injection import PromptedLM
from mops.mixture import Mixture, MixtureConfig
from mops.models import weights_hash  # noqa: F401 (also imported from here)
from mops.outputs import atomic_dir

CONFIG_NAME = "mops_config.json"
WEIGHTS_NAME = "mops_model.safetensors"
FORMAT = "mops-adapter/1"


def save_adapter(lm: PromptedLM, out, *, base_name: str, base_hash: str | None = None, extra: dict | None = None,
                 history: dict | None = None, force: bool = False) -> Path:
    """Write the adapter folder atomically; ``extra`` (data, training settings) goes into the
    config, ``history`` (losses, validation perplexities) into ``history.json``, and its gate
    snapshots, if any, into ``gate_snapshots.json`` and ``gate_heatmap.png``."""
    with atomic_dir(out, force) as tmp:
        write_adapter_files(lm, tmp, base_name=base_name, base_hash=base_hash or weights_hash(lm.base), extra=extra)
        if history is not None:
            (tmp / "history.json").write_text(json.dumps(history, indent=2) + "\n")
            if history.get("gate_snapshots"):
                save_gate_analysis(tmp, history["gate_snapshots"], title=f"gate weights on {base_name}")
    return Path(out)


def mixture_tensors(mixture: Mixture) -> dict[str, torch.Tensor]:
    """The mixture's trainable state as safetensors stores it (CPU, contiguous)."""
    return {k: v.detach().cpu().contiguous() for k, v in mixture.state_dict().items()}


def write_adapter_files(lm: PromptedLM, folder, *, base_name: str, base_hash: str, extra: dict | None = None) -> None:
    folder = Path(folder)
    config = {
        "format": FORMAT,
        "mixture": asdict(lm.mixture.config),
        "width": lm.base.config.hidden_size,
        "n_layers": lm.base.config.num_hidden_layers,
        "base_model": base_name,
        "base_weights_sha256": base_hash,
        **(extra or {}),
    }
    save_file(mixture_tensors(lm.mixture), folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter_config(adapter_dir, hint: str = "") -> dict:
    """The adapter's config, checked to be one ``mops-recover`` wrote; ``hint`` (where a
    caller's default adapter comes from) ends the error when there is none."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"adapter {str(adapter_dir)!r}: no {CONFIG_NAME}; expected a folder written by mops-recover"
                        + (f"; {hint}" if hint else ""))
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise UserError(f"adapter {str(adapter_dir)!r}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load(base, adapter_dir, dtype: str = "float32", device: str = "cpu", check_base: bool = True) -> PromptedLM:
    """A base (a model spec, or a loaded model) with the adapter in ``adapter_dir`` on it."""
    config = read_adapter_config(adapter_dir)
    if isinstance(base, (str, Path)):
        from mops.models import load_model

        base, _ = load_model(base, dtype=dtype, device=device)
    if check_base:
        found = weights_hash(base)
        if found != config["base_weights_sha256"]:
            raise UserError(
                f"adapter {str(adapter_dir)!r} was trained on {config['base_model']!r} (weights sha256 "
                f"{config['base_weights_sha256'][:12]}), not on this base (sha256 {found[:12]}); load it onto that base"
            )
    mixture = Mixture(MixtureConfig(**config["mixture"]), config["width"])
    state = load_file(Path(adapter_dir) / WEIGHTS_NAME)
    mixture.load_state_dict(state)
    param = next(base.parameters())
    return PromptedLM(base, mixture.to(param.device)).eval()


def read_source_prompt(adapter_dir, base_hash: str, target: MixtureConfig, width: int) -> torch.Tensor:
    """The m x d prompt of a single-prompt adapter (K = 1), to serve as a frozen expert
    (ATTEMPT's pre-trained source prompts); it must come from the same base and sizes."""
    config = read_adapter_config(adapter_dir)
    mixture = config["mixture"]
    if mixture["n_experts"] != 1 or mixture["gate"] == "attempt":
        raise UserError(f"source prompt {str(adapter_dir)!r}: has {mixture['n_experts']} experts ({mixture['gate']} gate); "
                        "expected a single-prompt adapter (--gate single)")
    if config["base_weights_sha256"] != base_hash:
        raise UserError(f"source prompt {str(adapter_dir)!r} was trained on another base ({config['base_model']!r})")
    found = (mixture["prompt_len"], config["width"], mixture["inject_layer"])
    if found != (target.prompt_len, width, target.inject_layer):
        raise UserError(f"source prompt {str(adapter_dir)!r}: m = {found[0]}, d = {found[1]}, l = {found[2]}; "
                        f"this mixture needs m = {target.prompt_len}, d = {width}, l = {target.inject_layer}")
    return load_file(Path(adapter_dir) / WEIGHTS_NAME)["experts.weight"][0]
