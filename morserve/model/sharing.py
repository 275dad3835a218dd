"""Sequence / middle-sequence sharing: fixed-depth recursive models as vanilla layer lists.

A MoRModel stores the B unique shared layers once, in `block`. Cycle sharing applies them as
b0 b1 .. b(B-1), Nr times (one recursion = one pass of the block); sequence sharing applies each
layer Nr times in a row: b0 x Nr, b1 x Nr, ... There is no block pass a token could exit after,
so sequence layouts have no router (the config refuses one) and every token takes all B * Nr
applications. Such a model *is* a vanilla model whose layer list repeats the same modules:
`vanilla_view` builds that model (Nr = 1, no router) around the very same parameter tensors.
Training runs the view (gradients of a repeated layer add up in the shared tensors), and loading
a checkpoint returns the view, which the engine serves like any vanilla Llama.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from morserve.config import SEQUENCE_SHARINGS, ModelConfig, MoRConfig
from morserve.model.mor import MoRModel


def shared_layer_order(config: ModelConfig) -> list[int]:
    """Indices into `block` in the order the shared layers run (cycle or sequence)."""
    b, nr = config.num_block_layers, config.mor.num_recursions
    if config.mor.sharing in SEQUENCE_SHARINGS:
        return [j for j in range(b) for _ in range(nr)]
    return [j for _ in range(nr) for j in range(b)]


def vanilla_config(config: ModelConfig) -> ModelConfig:
    """The Nr = 1, router-free config with one layer per application of a fixed-depth model
    (middle_cycle layout when there are 3+ layers, like any vanilla Llama; cycle otherwise)."""
    if config.mor.router is not None:
        raise ValueError(f"a {config.mor.router}-choice model has per-token depths: it has no vanilla form")
    layers = config.num_prologue_layers + config.num_block_layers * config.mor.num_recursions + \
        config.num_epilogue_layers
    sharing = "middle_cycle" if layers >= 3 else "cycle"
    return replace(config, num_hidden_layers=layers,
                   mor=MoRConfig(num_recursions=1, sharing=sharing, router=None,
                                 kv_mode=config.mor.kv_mode)).validate()


def vanilla_view(model: MoRModel) -> MoRModel:
    """A vanilla MoRModel whose layers are `model`'s own modules in application order (shared
    parameters, not copies). Needs a fixed-depth model (router None)."""
    config = vanilla_config(model.config)
    order = [*model.prologue, *(model.block[j] for j in shared_layer_order(model.config)), *model.epilogue]
    with torch.device("meta"):
        view = MoRModel(config)
    n_pro, n_epi = config.num_prologue_layers, config.num_epilogue_layers
    view.prologue = nn.ModuleList(order[:n_pro])
    view.block = nn.ModuleList(order[n_pro:len(order) - n_epi])
    view.epilogue = nn.ModuleList(order[len(order) - n_epi:])
    view.embed_tokens, view.norm, view.lm_head = model.embed_tokens, model.norm, model.lm_head
    return view.train(model.training)


def servable(model: MoRModel) -> MoRModel:
    """`model` itself when its layout is a block loop; its vanilla view for sequence sharing."""
    return vanilla_view(model) if model.config.mor.sharing in SEQUENCE_SHARINGS else model
