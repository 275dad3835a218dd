"""Our checkpoint format: a directory with config.json, model.safetensors (MoRModel state dict:
the shared block stored once) and tokenizer.json (+ tokenizer_config.json)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from morserve.config import ModelConfig
from morserve.model.mor import MoRModel
from morserve.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it describes."""


def save_checkpoint(model: MoRModel, tokenizer: Tokenizer | None, path: str | Path,
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json, model.safetensors (optionally cast to `dtype`) and the tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / "config.json")
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS), metadata={"format": "pt", "producer": "morserve"})
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def load_state_dict_into(model: MoRModel, state: dict[str, torch.Tensor], source: str) -> MoRModel:
    """Copy `state` into `model`, naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append("shape mismatches " + "; ".join(shapes[:8]))
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])
    return model


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[MoRModel, Tokenizer | None]:
    path = Path(path)
    if not (path / "config.json").exists() or not (path / WEIGHTS).exists():
        raise CheckpointError(f"{path} is not a morserve checkpoint (needs config.json and {WEIGHTS})")
    config = ModelConfig.load(path / "config.json")
    model = MoRModel(config)
    load_state_dict_into(model, load_file(str(path / WEIGHTS)), str(path / WEIGHTS))
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    return model.to(device=device, dtype=dtype).eval(), tokenizer
