import pytest
import torch

from mops.errors import UserError
from mops.models import embedded_gguf, load_model, resolve_checkpoint


def test_loads_a_checkpoint_folder_with_dtype(tiny_dir):
    model, tok = load_model(tiny_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.eos_token_id == 2 and tok.pad_token_id is not None


@pytest.mark.parametrize("spec,message", [
    ("smollm3-1b", "no such file or folder"),
    ("./missing-folder", "no such file or folder"),
])
def test_unknown_names_and_broken_paths_list_what_is_accepted(spec, message):
    with pytest.raises(UserError, match=message) as err:
        resolve_checkpoint(spec)
    assert "smollm2-135m" in str(err.value) and ".gguf" in str(err.value)


def test_folder_without_config_and_non_model_file_are_refused(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a folder or a .gguf file"):
        resolve_checkpoint(tmp_path / "weights.bin")


def test_bad_dtype_is_refused(tiny_dir):
    with pytest.raises(UserError, match="dtype 'fp8'"):
        load_model(tiny_dir, dtype="fp8")


def test_a_hub_id_passes_through_only_when_it_looks_like_one():
    assert resolve_checkpoint("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.embedded
def test_a_gguf_file_is_converted_once_into_the_movable_cache(tmp_path, monkeypatch, embedded_dir):
    monkeypatch.setenv("MOPS_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_checkpoint(embedded_gguf("smollm2-135m"))
    assert folder.startswith(str(tmp_path / "cache")) and "quantization_config" not in open(f"{folder}/config.json").read()
    assert resolve_checkpoint(embedded_gguf("smollm2-135m")) == folder  # cached, not converted again
    model, tok = load_model(folder)
    reference, _ = load_model(embedded_dir)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.name.startswith(".")] == []
