"""Weights of the reference MoR code (github raymin0223/mixture_of_recursions) -> MoRModel.

Key layout (Llama parameter names inside every layer; Nr recursions, B layers per recursion):
- everywhere: `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight` (absent or equal
  to the embedding when tied);
- expert choice, middle_cycle: first layer `model.layers.0.*`; recursion r = 1..Nr:
  `model.layers.{r}.block.{j}.*` (j < B) and its router `model.layers.{r}.mor_router.router.*`
  (linear: `router.weight` [1, d]; mlp: `router.0.weight`, `router.2.weight`); last layer
  `model.layers.{Nr+1}.*`;
- token choice, middle_cycle: first layer `model.layers.0.*`; one MoR layer `model.layers.1.` with
  `block_list.{r}.{j}.*` (r = 0..Nr-1), `mor_router.router.*` (out dim Nr) and, with loss_free
  balancing, `router_bias` [Nr]; last layer `model.layers.2.*`;
- cycle sharing (no unique first/last layer): expert recursion r is `model.layers.{r-1}`; the
  reference code makes the token-choice MoR layer `model.layers` itself, so its keys are
  `model.layers.block_list.*` / `model.layers.mor_router.*` (`model.layers.0.` is accepted too).

Every recursion carries its own copy of the shared block. The copies must be equal (within a
tiny tolerance) and are stored once; a copy may be absent (HF's safetensors writer drops tensors
that share storage) as long as one is present. Copies that differ are refused with an
explanation: expert-choice models trained before the reference code fixed its issue #17 have a
separate attention per recursion. Keys of the rotary embedding cache are ignored; any other
tensor the layout does not explain is an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from morserve.checkpoint.own import save_checkpoint
from morserve.checkpoint.reference_config import ReferenceConfig, load_training_config
from morserve.checkpoint.state import CheckpointError, build_model
from morserve.config import ModelConfig
from morserve.model.mor import MoRModel
from morserve.tokenizer import TOKENIZER_FILE, Tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
IGNORED = re.compile(r"rotary_emb\.inv_freq$")
COPY_RTOL, COPY_ATOL = 1e-5, 1e-7
ISSUE_17 = (
    "This is the signature of expert-choice models trained with the reference code before its "
    "issue #17 was fixed (commit 82c97f2): MoRLlamaDecoderLayer replaced each recursion's attention "
    "with a freshly initialised module, so every recursion trained its own q/k/v/o projections "
    "while the MLP and norms stayed shared. morserve runs one shared block for all recursions; "
    "picking or averaging one copy would change the model's outputs, so it refuses. Retrain (or "
    "continue training) with the reference code at or after commit 82c97f2 and convert that checkpoint.")


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
    raise CheckpointError(f"no reference weights at {path} (looked for a file or one of {WEIGHT_FILES})")


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "module"):          # Lightning / DeepSpeed wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file or directory (safetensors or torch pickles, sharded or not)."""
    path = _weights_file(Path(path))
    if path.name.endswith(".index.json"):
        state = {}
        for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
            state.update(_read_one(path.parent / shard))
        return state
    return _read_one(path)


def _token_mor_prefix(state: dict[str, torch.Tensor], config: ModelConfig) -> str:
    if config.mor.sharing == "middle_cycle":
        return "model.layers.1."
    return "model.layers.0." if any(k.startswith("model.layers.0.block_list.") for k in state) else "model.layers."


def _layout(state: dict[str, torch.Tensor], config: ModelConfig) -> tuple[dict[str, str], list[str], list[str]]:
    """(plain-layer prefix -> our prefix, block-copy prefix per recursion, router prefix per router)."""
    nr, middle = config.mor.num_recursions, config.mor.sharing == "middle_cycle"
    if config.mor.router == "expert":
        first = 1 if middle else 0
        layers = {"model.layers.0.": "prologue.0.", f"model.layers.{nr + 1}.": "epilogue.0."} if middle else {}
        copies = [f"model.layers.{first + r}.block." for r in range(nr)]
        routers = [f"model.layers.{first + r}.mor_router." for r in range(nr)]
    else:
        mor = _token_mor_prefix(state, config)
        layers = {"model.layers.0.": "prologue.0.", "model.layers.2.": "epilogue.0."} if middle else {}
        copies = [f"{mor}block_list.{r}." for r in range(nr)]
        routers = [f"{mor}mor_router."]
    return layers, copies, routers


def _shared_block(state: dict[str, torch.Tensor], copies: list[str], config: ModelConfig,
                  used: set[str]) -> dict[str, torch.Tensor]:
    """One tensor per block parameter, after checking that every recursion's copy is equal."""
    names = sorted({k[len(p):] for p in copies for k in state if k.startswith(p)})
    if not names:
        raise CheckpointError(f"no shared-block tensors under {copies[0]!r} (is mor.type / sharing right?)")
    layers = {n.split(".", 1)[0] for n in names}
    if layers != {str(j) for j in range(config.num_block_layers)}:
        raise CheckpointError(
            f"the weights have block layers {sorted(layers)} per recursion, the config implies "
            f"{config.num_block_layers} ({config.num_hidden_layers} layers, {config.mor.num_recursions} "
            f"recursions, {config.mor.sharing} sharing)")
    out, differ = {}, []
    for name in names:
        present = [(r + 1, state[p + name]) for r, p in enumerate(copies) if p + name in state]
        used.update(p + name for p in copies)
        base_r, base = present[0]
        for r, t in present[1:]:
            if t.shape != base.shape or not torch.allclose(t.float(), base.float(), rtol=COPY_RTOL, atol=COPY_ATOL):
                diff = "shape" if t.shape != base.shape else f"{(t.float() - base.float()).abs().max().item():.3g}"
                differ.append((name, base_r, r, diff))
        out[f"block.{name}"] = base
    if differ:
        listed = "; ".join(f"block.{n} recursion {a} vs {b} (max |diff| {d})" for n, a, b, d in differ[:6])
        more = f" (and {len(differ) - 6} more)" if len(differ) > 6 else ""
        if config.mor.router == "expert" and all(".self_attn." in n for n, *_ in differ):
            raise CheckpointError(f"the attention weights of the shared block differ between recursions: "
                                  f"{listed}{more}. {ISSUE_17}")
        raise CheckpointError(
            f"the per-recursion copies of the shared block differ: {listed}{more}. morserve serves "
            "models whose recursions share one block (was it trained with relaxation, ln_share false, "
            "or edited after training?)")
    return out


def convert_state_dict(state: dict[str, torch.Tensor], ref: ReferenceConfig) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Reference-code tensors -> (our config, completed with the router bias if any; MoRModel state).
    A DDP/DeepSpeed `module.` prefix is dropped, and so are rotary-embedding caches."""
    state = {k.removeprefix("module."): v for k, v in state.items() if not IGNORED.search(k)}
    config = ref.model
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str) -> None:
        if src not in state:
            raise CheckpointError(f"the reference weights lack {src!r}")
        out[dst] = state[src]
        used.add(src)

    take("model.embed_tokens.weight", "embed_tokens.weight")
    take("model.norm.weight", "norm.weight")
    if not config.tie_word_embeddings:
        take("lm_head.weight", "lm_head.weight")
    elif "lm_head.weight" in state:
        used.add("lm_head.weight")
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise CheckpointError("tie_word_embeddings is true but lm_head.weight differs from "
                                  "model.embed_tokens.weight: set tie_word_embeddings false in the config")
    layers, copies, routers = _layout(state, config)
    for src_prefix, dst_prefix in layers.items():
        names = [k for k in state if k.startswith(src_prefix)]
        if not names:
            raise CheckpointError(f"the reference weights have no layer {src_prefix.rstrip('.')!r}")
        for k in names:
            take(k, dst_prefix + k[len(src_prefix):])
    out.update(_shared_block(state, copies, config, used))
    ours = [f"routers.{r}." for r in range(len(routers))] if config.mor.router == "expert" else ["router."]
    for src_prefix, dst_prefix in zip(routers, ours):
        names = [k for k in state if k.startswith(src_prefix)]
        if not names:
            raise CheckpointError(f"the reference weights have no router {src_prefix.rstrip('.')!r}")
        for k in names:
            take(k, dst_prefix + k[len(src_prefix):])
    if ref.router_bias_in_weights:
        key = routers[0].removesuffix("mor_router.") + "router_bias"
        take(key, "router_bias")
        bias = out.pop("router_bias").float() / ref.token_alpha    # ours is added to softmax before alpha
        config = replace(config, mor=replace(config.mor, router_bias=bias.tolist()))
    leftover = sorted(set(state) - used)
    if leftover:
        raise CheckpointError(f"tensors the {config.mor.router}-choice {config.mor.sharing} layout does not "
                              f"explain: {leftover[:8]}{' ...' if len(leftover) > 8 else ''}")
    return config.validate(), out


def load_reference_checkpoint(weights_path: str | Path, config_path: str | Path,
                              hf_config: str | Path | dict | None = None, device: str | torch.device = "cpu",
                              dtype: torch.dtype = torch.float32) -> MoRModel:
    """A MoRModel from reference weights and their training config (see reference_config)."""
    config, state = convert_state_dict(read_weights(weights_path), load_training_config(config_path, hf_config))
    return build_model(config, state, str(weights_path), device, dtype)


def convert_reference_checkpoint(weights_path: str | Path, config_path: str | Path, out_dir: str | Path,
                                 tokenizer: Tokenizer | str | Path | None = None,
                                 hf_config: str | Path | dict | None = None) -> Path:
    """Write a reference checkpoint in our format. `tokenizer`: a Tokenizer, a directory holding
    tokenizer.json, or None to use the one next to the weights if there is one."""
    model = load_reference_checkpoint(weights_path, config_path, hf_config)
    if tokenizer is None:
        folder = Path(weights_path) if Path(weights_path).is_dir() else Path(weights_path).parent
        tokenizer = folder if (folder / TOKENIZER_FILE).is_file() else None
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.load(tokenizer)
    return save_checkpoint(model, tokenizer, out_dir)
