"""Turn a state dict in MoRModel names into a model: check that it matches the config exactly
(naming every missing, unexpected or mis-shaped tensor) and build the model around the given
tensors without a throw-away random initialisation."""

from __future__ import annotations

import torch

from morserve.config import ModelConfig
from morserve.model.mor import MoRModel

MAX_NAMED = 8


def vanilla_layer(index: int, num_layers: int) -> str:
    """MoRModel name of layer `index` of an L-layer Llama loaded as a vanilla (Nr = 1) model:
    layer 0 the prologue, layers 1..L-2 the block, layer L-1 the epilogue."""
    if index == 0:
        return "prologue.0"
    return "epilogue.0" if index == num_layers - 1 else f"block.{index - 1}"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it describes."""


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - MAX_NAMED} more" if len(keys) > MAX_NAMED else ""
    return ", ".join(keys[:MAX_NAMED]) + more


def check_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError unless `state` holds exactly the tensors MoRModel(config) has."""
    with torch.device("meta"):
        expected = MoRModel(config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} is {tuple(state[k].shape)}, the config needs {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped tensors: {_names(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], source: str,
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MoRModel:
    """An eval-mode MoRModel holding copies of `state` (cast to dtype, moved to device). Copies
    are made by torch's allocator: file readers hand out buffers of arbitrary alignment, and CPU
    matmul kernels round differently on misaligned data, which would make a loaded model differ
    from the same weights in torch's memory in the last bits."""
    check_state_dict(config, state, source)
    with torch.device("meta"):
        model = MoRModel(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items()},
                          strict=True, assign=True)
    return model.eval()
