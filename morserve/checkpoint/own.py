"""Our checkpoint format: a directory with config.json (`ModelConfig.to_dict()`: HF Llama fields
plus a `mor` section), model.safetensors (the MoRModel state dict: the shared block stored once)
and, when the model has one, tokenizer.json + tokenizer_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from morserve.checkpoint.state import CheckpointError, build_model
from morserve.config import ModelConfig
from morserve.model.mor import MoRModel
from morserve.model.sharing import servable
from morserve.tokenizer import TOKENIZER_FILE, Tokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def save_checkpoint(model: MoRModel, tokenizer: Tokenizer | None, path: str | Path,
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json, model.safetensors (cast to `dtype` if given) and the tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / CONFIG)
    state = {k: v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS), metadata={"format": "pt", "producer": "morserve"})
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def is_own_checkpoint(path: str | Path) -> bool:
    """A directory whose config.json is ours (has a `mor` section), next to model.safetensors."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        return False
    try:
        return "mor" in json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError:
        return False


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    as_served: bool = True) -> tuple[MoRModel, Tokenizer | None]:
    """Model (eval mode, on `device` in `dtype`) and tokenizer (None if the directory has none).
    A sequence-shared model comes back as its vanilla view (`morserve.model.sharing`) unless
    `as_served` is False (e.g. to train it further and save it shared again)."""
    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a morserve checkpoint: {name} is missing")
    config = ModelConfig.load(path / CONFIG)
    try:
        state = load_file(str(path / WEIGHTS))
    except SafetensorError as exc:
        raise CheckpointError(f"cannot read {path / WEIGHTS}: {exc}") from exc
    model = build_model(config, state, str(path / WEIGHTS), device, dtype)
    if as_served:
        model = servable(model)
    tokenizer = Tokenizer.load(path) if (path / TOKENIZER_FILE).exists() else None
    return model, tokenizer
