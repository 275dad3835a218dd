"""Map the reference MoR code's training config (github raymin0223/mixture_of_recursions: a YAML
or JSON file, a SmolLM-style HF config plus recursion/MoR overrides) onto our ModelConfig.

Model shape: the HF Llama fields (hidden_size, num_hidden_layers, ...), taken from `hf_config`
(e.g. the config.json HF `save_pretrained` writes next to the weights), then the file's top
level, then its `model_config` section (later wins). The reference code fetches the shape of
`model_name_or_path` from the Hub; morserve never does, so it must be in one of those places.

| reference key                                   | MoRConfig                                     |
|-------------------------------------------------|-----------------------------------------------|
| recursive.num_recursion / num_recursion(s)      | num_recursions                                |
| recursive.sharing / sharing                     | sharing (middle_cycle, cycle)                 |
| mor.type                                        | router (expert, token)                        |
| mor.router_type                                 | router_type (linear; mlp and wide_mlp -> mlp) |
| mor.temp                                        | temp                                          |
| mor.capacity (comma string or list)             | capacity (expert only; default (Nr-i)/Nr)     |
| mor.expert.router_func, mor.expert.alpha        | router_func (sigmoid, tanh), alpha (0.1)      |
| mor.token.router_func, mor.token.alpha          | router_func softmax, alpha (default 1.0)      |
| mor.token.balancing: loss_free                  | router_bias, read from the weights            |
| kv_sharing.enable / kv_sharing: true            | kv_mode share_first (else recursion)          |

Training-only keys (losses, warm-up, coefficients, initialisation) are ignored. Anything that
changes inference in a way MoRConfig cannot express is rejected with the reason: relaxation
(per-recursion LoRA / prompts), `sequence` sharing, unshared layer norms (ln_share false),
random routers, the auxiliary-router (aux_router) sampling, unweighted gating, expert routers
without sigmoid/tanh, token routers with sigmoid, KV sharing with update_cache, models without
MoR routing. Unknown keys inside the recursion/MoR sections are rejected too (typos must not pass
silently). The routing threshold is not a training setting: our default applies (0.5 for sigmoid,
0 for tanh) and can be edited in the converted checkpoint's config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from morserve.checkpoint.state import CheckpointError
from morserve.config import ModelConfig, MoRConfig

HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
             "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_scaling")
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
KNOWN_KEYS = {
    "recursive": {"enable", "base_depth", "num_recursion", "sharing", "ln_share", "initialization"},
    "kv_sharing": {"enable", "base_depth", "num_recursion", "sharing", "update_cache"},
    "mor": {"enable", "type", "capacity", "rand_router", "router_type", "z_loss", "z_coeff", "temp",
            "expert", "token"},
    "mor.expert": {"cap_warmup_step", "router_func", "alpha", "sampling", "include_first", "coeff", "gating"},
    "mor.token": {"bal_warmup_step", "router_func", "alpha", "balancing", "coeff", "u", "gating"},
}
ROUTER_TYPES = {"linear": "linear", "mlp": "mlp", "wide_mlp": "mlp"}


@dataclass
class ReferenceConfig:
    """The model config, plus what the weights must supply: token-choice `loss_free` balancing
    keeps its router bias as a tensor (`router_bias`), scaled by the router's alpha."""

    model: ModelConfig
    router_bias_in_weights: bool = False
    token_alpha: float = 1.0


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training config {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot parse training config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"training config {path} is not a mapping")
    return data


def _section(cfg: dict[str, Any], key: str, name: str | None = None) -> dict[str, Any]:
    """A sub-mapping (`key: true/false` is read as {enable: ...}); unknown keys are rejected."""
    value = cfg.get(key)
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"enable": value}
    if not isinstance(value, dict):
        raise CheckpointError(f"training config: {name or key} must be a mapping, got {value!r}")
    unknown = set(value) - KNOWN_KEYS.get(name or key, set(value))
    if unknown:
        raise CheckpointError(f"training config: unknown key(s) {sorted(unknown)} in {name or key}; "
                              f"known: {sorted(KNOWN_KEYS[name or key])}")
    return value


def _shape(cfg: dict[str, Any], hf_config: dict[str, Any] | None) -> dict[str, Any]:
    model_config = cfg.get("model_config") or {}
    if not isinstance(model_config, dict):
        raise CheckpointError(f"training config: model_config must be a mapping, got {model_config!r}")
    shape: dict[str, Any] = {}
    for layer in (hf_config or {}, cfg, model_config):
        shape.update({k: layer[k] for k in HF_FIELDS if layer.get(k) is not None})
    missing = [k for k in SHAPE_FIELDS if k not in shape]
    if missing:
        raise CheckpointError(
            f"the training config does not give the model shape ({', '.join(missing)} missing): add the HF "
            f"config of {cfg.get('model_name_or_path') or 'the base model'} under `model_config`, or put its "
            "config.json next to the weights")
    return shape


def _reject(condition: bool, message: str) -> None:
    if condition:
        raise CheckpointError(f"unsupported reference checkpoint: {message}")


def parse_training_config(cfg: dict[str, Any], hf_config: dict[str, Any] | None = None) -> ReferenceConfig:
    """Map a parsed training config (see the module docstring) onto our configuration."""
    rec, kv, mor = _section(cfg, "recursive"), _section(cfg, "kv_sharing"), _section(cfg, "mor")
    expert, token = _section(mor, "expert", "mor.expert"), _section(mor, "token", "mor.token")
    relaxation = cfg.get("relaxation")
    _reject(bool(relaxation.get("enable") if isinstance(relaxation, dict) else relaxation),
            "relaxation (per-recursion LoRA or prompts) makes the recursions differ; morserve shares one block")
    _reject(rec.get("enable") is False, "recursive.enable is false: not a recursive model")
    _reject(not mor.get("enable", bool(mor)), "mor is not enabled: morserve converts MoR (routed) checkpoints")
    _reject(rec.get("ln_share") is False, "recursive.ln_share is false: the layer norms are not shared")
    _reject(bool(mor.get("rand_router")), "mor.rand_router: random routing has no router weights")
    _reject(bool(kv.get("update_cache")), "kv_sharing.update_cache (hybrid KV sharing) is not share-first")

    num = rec.get("num_recursion", cfg.get("num_recursions", cfg.get("num_recursion")))
    _reject(not isinstance(num, int) or num < 2, f"num_recursion must be an integer >= 2 for MoR, got {num!r}")
    sharing = rec.get("sharing", cfg.get("sharing", "middle_cycle"))
    _reject(sharing not in ("middle_cycle", "cycle"), f"sharing {sharing!r} (morserve serves middle_cycle or cycle)")
    router = mor.get("type", "expert")
    _reject(router not in ("expert", "token"), f"mor.type must be expert or token, got {router!r}")
    router_type = mor.get("router_type", "linear")
    _reject(router_type not in ROUTER_TYPES, f"mor.router_type {router_type!r} (linear, mlp or wide_mlp)")

    capacity = None
    token_alpha = 1.0
    if router == "expert":
        router_func = expert.get("router_func", "sigmoid")
        _reject(router_func not in ("sigmoid", "tanh"), f"mor.expert.router_func {router_func!r} (sigmoid or tanh)")
        _reject(expert.get("sampling", "aux_loss") != "aux_loss",
                f"mor.expert.sampling {expert.get('sampling')!r}: the auxiliary router decides depth at "
                "inference, which MoRConfig cannot express (aux_loss models only)")
        _reject(expert.get("gating", "weighted") != "weighted", "mor.expert.gating must be weighted")
        alpha = float(expert.get("alpha", 0.1))
        capacity = mor.get("capacity")
        if isinstance(capacity, str):
            capacity = [float(c) for c in capacity.split(",")]
        elif capacity is not None:
            capacity = [float(c) for c in capacity]
    else:
        _reject(token.get("router_func", "softmax") != "softmax",
                f"mor.token.router_func {token.get('router_func')!r} (token choice needs softmax)")
        _reject(token.get("gating", "weighted") != "weighted", "mor.token.gating must be weighted")
        balancing = token.get("balancing", "loss")
        _reject(balancing not in ("loss", "loss_free"), f"mor.token.balancing {balancing!r} (loss or loss_free)")
        router_func, alpha = "softmax", float(token.get("alpha", 1.0))
        token_alpha = alpha
        _reject(balancing == "loss_free" and alpha <= 0, "loss_free balancing needs mor.token.alpha > 0")

    shape = _shape(cfg, hf_config)
    fixed = 2 if sharing == "middle_cycle" else 0
    per_block = (int(shape["num_hidden_layers"]) - fixed) // num
    _reject(per_block < 1, f"{shape['num_hidden_layers']} layers cannot hold {num} recursions with {sharing} sharing")
    # like the reference code, drop layers that do not fill a whole recursion
    shape["num_hidden_layers"] = fixed + per_block * num
    mor_config = MoRConfig(num_recursions=num, sharing=sharing, router=router, router_func=router_func,
                           router_type=ROUTER_TYPES[router_type], alpha=alpha, capacity=capacity,
                           kv_mode="share_first" if kv.get("enable") else "recursion",
                           temp=float(mor.get("temp", 1.0)))
    config = ModelConfig.from_dict({**shape, "mor": vars(mor_config)})
    return ReferenceConfig(config, router_bias_in_weights=router == "token" and token.get("balancing") == "loss_free",
                           token_alpha=token_alpha)


def load_training_config(path: str | Path, hf_config: str | Path | dict[str, Any] | None = None) -> ReferenceConfig:
    """Read a training config file (YAML or JSON) and, optionally, an HF config.json giving the shape."""
    if hf_config is not None and not isinstance(hf_config, dict):
        hf_config = read_config_file(hf_config)
    return parse_training_config(read_config_file(path), hf_config)
