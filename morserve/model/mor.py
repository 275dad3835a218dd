"""The MoR language model: embedding, prologue layers, one shared recursion block, epilogue
layers, final norm and LM head, plus the routers. Holds the weights once; how tokens move through
it is decided by the caller (the dense reference forward, or the engine's runner)."""

from __future__ import annotations

import torch
from torch import nn

from morserve.config import ModelConfig
from morserve.model.layers import DecoderLayer, RMSNorm, linear, rope_cos_sin
from morserve.model.routing import routing_for


class MoRModel(nn.Module):
    """Parameter names (our checkpoint format stores exactly these):
    embed_tokens, prologue.{i}, block.{j}, epilogue.{i}, norm, lm_head (untied only),
    routers.{r} (expert, r = 0..Nr-1 for recursion r+1) or router (token choice)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.prologue = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_prologue_layers))
        self.block = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_block_layers))
        self.epilogue = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_epilogue_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.routing = routing_for(config.mor)
        self.routers, self.router = self.routing.modules(d)
        self._router_stack: tuple = (None, None)       # (the expert routers' weight versions, their stack)

    @property
    def num_recursions(self) -> int:
        return self.config.mor.num_recursions

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> "MoRModel":
        """Random init (normal(0, std) for matrices, ones for norms), deterministic given seed."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def expert_router_logit(self, recursion: int, h: torch.Tensor) -> torch.Tensor:
        """Raw score of expert router for `recursion` (1-based) on h [..., d] -> [...]."""
        return self.routers[recursion - 1](h / self.config.mor.temp).squeeze(-1)

    def expert_router_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Raw scores of every expert router on h [..., d] -> [..., Nr] (column r-1 = router r)."""
        return self.expert_router_scores(h / self.config.mor.temp)

    def expert_router_scores(self, scaled: torch.Tensor, num: int | None = None) -> torch.Tensor:
        """Raw scores of the first `num` expert routers (all if None) on their input
        scaled = h / temp [..., d] -> [..., num]; linear routers as one GEMM over their stacked
        weights, stacked once and again only when a router weight changes (or autograd records)."""
        routers = self.routers[:num] if num is not None else self.routers
        if self.config.mor.router_type != "linear":
            return torch.cat([router(scaled) for router in routers], dim=-1)
        return scaled @ self._stacked_router_weight()[: len(routers)].t()

    def _stacked_router_weight(self) -> torch.Tensor:
        weights = [router.router.weight for router in self.routers]
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return torch.cat(weights)
        key = tuple((w.data_ptr(), w._version, w.dtype) for w in weights)
        if self._router_stack[0] != key:
            with torch.no_grad():
                self._router_stack = (key, torch.cat(weights))
        return self._router_stack[1]

    def token_router_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Token-choice router scores h [..., d] -> [..., Nr]."""
        return self.router(h / self.config.mor.temp)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: h [..., d] -> logits [..., V]."""
        return self.head(self.norm(h))

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """The LM head alone, on final-normed rows [..., d] -> logits [..., V]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(normed, weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
