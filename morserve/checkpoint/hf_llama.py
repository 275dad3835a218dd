"""A plain Hugging Face Llama directory (config.json without a `mor` section, weights as
model.safetensors, sharded safetensors with an index, or pytorch_model.bin) as a vanilla model:
Nr = 1, layer 0 the prologue, layers 1..L-2 the block, layer L-1 the epilogue, so it is served
with plain continuous batching and can be the baseline of an MoR model or the input of
`morserve convert`. HF names map one to one (`model.layers.i.self_attn.q_proj` ...); RoPE is the
same half-rotation layout, so no weight is permuted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from morserve.checkpoint.reference_mor import WEIGHT_FILES, read_weights
from morserve.checkpoint.state import CheckpointError, build_model, vanilla_layer
from morserve.config import ConfigError, ModelConfig
from morserve.model.mor import MoRModel

LLAMA_TYPES = ("llama", "mistral")


def is_hf_llama(path: str | Path) -> bool:
    """A directory with weights and a config.json of a Llama-family model without a `mor` section."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return ("mor" not in config and config.get("model_type") in LLAMA_TYPES
            and any((path / name).is_file() for name in WEIGHT_FILES))


def hf_llama_config(data: dict) -> ModelConfig:
    """Our vanilla config for an HF Llama config.json, refusing what the model does not implement."""
    unsupported = {"hidden_act": data.get("hidden_act", "silu") != "silu",
                   "attention_bias": bool(data.get("attention_bias")), "mlp_bias": bool(data.get("mlp_bias")),
                   "sliding_window": data.get("model_type") == "mistral" and data.get("sliding_window") is not None}
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise CheckpointError(f"this Llama config uses {bad}, which morserve does not implement")
    try:
        # HF's LlamaConfig leaves embeddings untied unless the file says otherwise
        return ModelConfig.from_dict({"tie_word_embeddings": False, **data})
    except ConfigError as exc:
        raise CheckpointError(f"unsupported Llama config: {exc}") from exc


def hf_to_morserve(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """HF Llama parameter names -> MoRModel names of the vanilla (Nr = 1) layout."""
    out = {}
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue                                     # a buffer some versions saved
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            out[f"{vanilla_layer(int(index), num_layers)}.{rest}"] = value
        elif key.startswith("model."):
            out[key[len("model."):]] = value
        else:
            out[key] = value
    return out


def load_hf_llama(path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> MoRModel:
    path = Path(path)
    config = hf_llama_config(json.loads((path / "config.json").read_text()))
    if config.num_hidden_layers < 3:
        raise CheckpointError(f"{path}: a Llama with {config.num_hidden_layers} layers has no middle layers to serve "
                              "as the block (morserve needs at least 3)")
    state = hf_to_morserve(read_weights(path), config.num_hidden_layers)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return build_model(config, state, str(path), device, dtype)
