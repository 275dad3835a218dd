"""Checkpoints of the reference MoR training code (github raymin0223/mixture_of_recursions).

Weights (`pytorch_model.bin` or `model.safetensors`) use its key scheme:
- expert choice: `model.layers.0.*` (first layer, middle_cycle), `model.layers.{r}.block.{j}.*` and
  `model.layers.{r}.mor_router.router.*` for recursion r = 1..Nr, `model.layers.{Nr+1}.*` (last);
- token choice: `model.layers.0.*`, `model.layers.1.block_list.{r}.{j}.*` (r = 0..Nr-1),
  `model.layers.1.mor_router.router.*` ([Nr, d]), `model.layers.2.*`;
- `cycle` sharing has no unique first/last layer: recursions start at `model.layers.0`
  (expert: `model.layers.{r-1}`) and token choice's MoR layer is `model.layers.0`;
- `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`.
Every recursion carries its own copy of the shared block; they must be equal and are stored once.
The architecture comes from the training YAML/JSON (see `config_from_training_yaml`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from morserve.checkpoint.own import CheckpointError, load_state_dict_into
from morserve.config import ModelConfig, MoRConfig
from morserve.model.mor import MoRModel

HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
             "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
# "distinct copies" tolerance: copies saved from one shared parameter are bit-identical
COPY_ATOL = 0.0


def _section(cfg: dict, key: str) -> dict:
    value = cfg.get(key) or {}
    return value if isinstance(value, dict) else {}


def config_from_training_yaml(path: str | Path) -> ModelConfig:
    """Map the reference code's training config onto ModelConfig.

    Model shape: HF Llama fields at the top level or under `model_config`. Recursion:
    `recursive.num_recursion` (or `num_recursions`), `recursive.sharing` (middle_cycle | cycle;
    `sequence` variants are rejected), `mor.type` (expert | token), `mor.capacity` (list or
    comma string), `mor.router_type`, `mor.temp`, `mor.expert.router_func` / `alpha`,
    `mor.token.alpha`, `kv_sharing.enable` -> kv_mode share_first. Our own `mor` section is also
    accepted as is (keys of MoRConfig)."""
    path = Path(path)
    text = path.read_text()
    cfg: dict[str, Any] = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    shape = {**cfg, **_section(cfg, "model_config")}
    hf = {k: shape[k] for k in HF_FIELDS if k in shape}
    mor_in, rec, kv = _section(cfg, "mor"), _section(cfg, "recursive"), _section(cfg, "kv_sharing")
    if set(mor_in) <= set(MoRConfig.__dataclass_fields__) and "type" not in mor_in and not rec:
        return ModelConfig.from_dict({**hf, "mor": mor_in})
    sharing = rec.get("sharing", cfg.get("sharing", "middle_cycle"))
    if sharing not in ("middle_cycle", "cycle"):
        raise CheckpointError(f"sharing {sharing!r} is not supported (middle_cycle or cycle)")
    router = mor_in.get("type", "expert") if mor_in.get("enable", True) else None
    if router not in ("expert", "token", None):
        raise CheckpointError(f"mor.type must be expert or token, got {router!r}")
    if _section(cfg, "relaxation").get("enable"):
        raise CheckpointError("relaxed recursion (per-recursion LoRA) checkpoints are not supported")
    capacity = mor_in.get("capacity")
    if isinstance(capacity, str):
        capacity = [float(c) for c in capacity.split(",")]
    sub = _section(mor_in, router) if router else {}
    nr = int(rec.get("num_recursion", rec.get("num_recursions", cfg.get("num_recursions", 1))))
    mor = MoRConfig(
        num_recursions=nr, sharing=sharing, router=router,
        router_func=sub.get("router_func", "softmax" if router == "token" else "sigmoid") or "sigmoid",
        router_type=mor_in.get("router_type", "linear"), alpha=float(sub.get("alpha", 0.1)),
        capacity=capacity, kv_mode="share_first" if kv.get("enable") else "recursion",
        temp=float(mor_in.get("temp", 1.0)))
    return ModelConfig(**hf, mor=mor).validate()


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _layer_indices(config: ModelConfig) -> tuple[int | None, int | None]:
    """Reference-code layer index of the unique first and last layer (None for cycle)."""
    if config.mor.sharing == "cycle":
        return None, None
    last = config.mor.num_recursions + 1 if config.mor.router == "expert" else 2
    return 0, last


def _recursion_prefixes(config: ModelConfig) -> list[str]:
    """Key prefix of the block copy used at each recursion."""
    nr, offset = config.mor.num_recursions, 0 if config.mor.sharing == "cycle" else 1
    if config.mor.router == "token":
        return [f"model.layers.{offset}.block_list.{r}." for r in range(nr)]
    if config.mor.router == "expert":
        return [f"model.layers.{offset + r}.block." for r in range(nr)]
    raise CheckpointError("the reference MoR layout needs mor.type expert or token")


def convert_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Reference-code keys -> MoRModel keys, checking that every recursion's copy of the shared
    block is identical."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str) -> None:
        out[dst] = state[src]
        used.add(src)

    take("model.embed_tokens.weight", "embed_tokens.weight")
    take("model.norm.weight", "norm.weight")
    if not config.tie_word_embeddings:
        take("lm_head.weight", "lm_head.weight")
    first, last = _layer_indices(config)
    for idx, ours in ((first, "prologue.0."), (last, "epilogue.0.")):
        if idx is None:
            continue
        prefix = f"model.layers.{idx}."
        for k in [k for k in state if k.startswith(prefix) and ".block" not in k and "mor_router" not in k]:
            take(k, ours + k[len(prefix):])
    prefixes = _recursion_prefixes(config)
    first_copy = {k[len(prefixes[0]):]: k for k in state if k.startswith(prefixes[0])}
    if not first_copy:
        raise CheckpointError(f"no shared-block tensors under {prefixes[0]!r}")
    distinct = []
    for r, prefix in enumerate(prefixes[1:], start=2):
        for rest, k0 in first_copy.items():
            k = prefix + rest
            if k not in state:
                raise CheckpointError(f"recursion {r} lacks its copy of the shared block tensor {k!r}")
            used.add(k)
            if not torch.allclose(state[k].float(), state[k0].float(), rtol=0, atol=COPY_ATOL):
                distinct.append(f"{rest} (recursion 1 vs {r}, max diff "
                                f"{(state[k].float() - state[k0].float()).abs().max():.3g})")
    if distinct:
        raise CheckpointError(
            "the per-recursion copies of the shared block differ, so this checkpoint is not a "
            "weight-shared MoR model (models trained before the reference code fixed its issue #17 "
            "have distinct attention weights per recursion). morserve serves one shared block; "
            "retrain or uptrain with the fixed code, or average the copies yourself and accept the "
            "quality change. Differing tensors: " + "; ".join(distinct[:6]))
    for rest, k0 in first_copy.items():
        take(k0, "block." + rest)
    nr = config.mor.num_recursions
    router_prefix = "model.layers.{}.mor_router.router."
    if config.mor.router == "expert":
        offset = 0 if config.mor.sharing == "cycle" else 1
        for r in range(nr):
            p = router_prefix.format(offset + r)
            for k in [k for k in state if k.startswith(p)]:
                take(k, f"routers.{r}.router." + k[len(p):])
    else:
        p = router_prefix.format(0 if config.mor.sharing == "cycle" else 1)
        for k in [k for k in state if k.startswith(p)]:
            take(k, "router.router." + k[len(p):])
    leftover = sorted(k for k in set(state) - used if not re.search(r"rotary_emb|inv_freq", k))
    if leftover:
        raise CheckpointError(f"tensors the MoR layout does not explain: {leftover[:8]}")
    return out


def load_reference_checkpoint(weights: str | Path, config_path: str | Path) -> MoRModel:
    config = config_from_training_yaml(config_path)
    model = MoRModel(config)
    return load_state_dict_into(model, convert_state_dict(read_weights(weights), config), str(weights))

