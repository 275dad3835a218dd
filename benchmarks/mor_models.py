"""The models of the throughput benchmark: the MoR paper's 360M-scale configurations (SmolLM-360M
shape), a tiny twin of them for CPU runs, random weights, KV memory per token, and calibration of
random expert-choice routers so that each recursion takes the paper's capacity of tokens.

Layer counts (middle-cycle: 1 unique first layer + a shared block applied Nr times + 1 unique last
layer, so (L - 2) must be a multiple of Nr):
- vanilla-32, vanilla-34: plain Llama (Nr = 1, no router), the baselines;
- MoR-2 and MoR-3 at L = 32 (blocks of 15 and 10 layers), compared with vanilla-32;
- MoR-4 at L = 34 (1 + 8 + 1 unique layers), compared with vanilla-34.
The --quick twins keep the structure with L = 8 / 10 (blocks of 3, 2 and 2 layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from morserve.config import ModelConfig, MoRConfig
from morserve.model import MoRModel, reference_forward

SMOLLM_360M_SHAPE = dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_attention_heads=15,
                         num_key_value_heads=5, max_position_embeddings=2048, rope_theta=10000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
QUICK_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: `num_recursions` = 1 is a vanilla Transformer (no router)."""

    name: str
    num_layers: int
    num_recursions: int

    @property
    def is_vanilla(self) -> bool:
        return self.num_recursions == 1

    @property
    def baseline(self) -> str:
        """The vanilla model with the same number of layers (what the speed-ups are relative to)."""
        return f"vanilla-{self.num_layers}"


PAPER_SPECS = (ModelSpec("vanilla-34", 34, 1), ModelSpec("mor-4", 34, 4), ModelSpec("vanilla-32", 32, 1),
               ModelSpec("mor-2", 32, 2), ModelSpec("mor-3", 32, 3))
QUICK_SPECS = (ModelSpec("vanilla-10", 10, 1), ModelSpec("mor-4", 10, 4), ModelSpec("vanilla-8", 8, 1),
               ModelSpec("mor-2", 8, 2), ModelSpec("mor-3", 8, 3))


def model_config(shape: dict, spec: ModelSpec) -> ModelConfig:
    """Middle-cycle, expert-choice (sigmoid, threshold 0.5), recursion-wise KV; vanilla: no router."""
    mor = MoRConfig(num_recursions=spec.num_recursions, sharing="middle_cycle",
                    router="expert" if spec.num_recursions > 1 else None, kv_mode="recursion")
    return ModelConfig(num_hidden_layers=spec.num_layers, mor=mor, **shape).validate()


def random_model(cfg: ModelConfig, seed: int, std: float, device: torch.device, dtype: torch.dtype) -> MoRModel:
    """Random weights, normal(0, std), built on the CPU (seeded) then moved."""
    return MoRModel(cfg).init_weights(seed, std=std).to(device=device, dtype=dtype).eval()


def kv_layer_entries_per_token(cfg: ModelConfig) -> float:
    """Expected (layer, token) K/V entries per token: every token at the unique layers; at the
    block's layers one entry per recursion taken (recursion-wise: sum of capacities) or one in
    all (share-first)."""
    mor = cfg.mor
    unique = cfg.num_prologue_layers + cfg.num_epilogue_layers
    if mor.num_recursions == 1 or mor.kv_mode == "share_first":
        return unique + cfg.num_block_layers
    return unique + cfg.num_block_layers * sum(mor.capacities)


def kv_bytes_per_entry(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """K and V of one token at one layer."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def expected_kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> float:
    return kv_layer_entries_per_token(cfg) * kv_bytes_per_entry(cfg, dtype)


def weight_bytes(modules: list[torch.nn.Module]) -> int:
    """Bytes of the parameters of `modules` (read once per forward through them)."""
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def inverse_activation(value: float, router_func: str) -> float:
    """The raw router score whose activation is `value` (the decision cut of the threshold rule)."""
    if router_func == "sigmoid":
        return math.log(value / (1.0 - value))
    if router_func == "tanh":
        return math.atanh(value)
    raise ValueError(f"expert routing has no router_func {router_func!r}")


@torch.inference_mode()
def calibrate_router_bias(model: MoRModel, samples: torch.Tensor, targets: list[float] | None = None) -> list[float]:
    """Set `model.config.mor.router_bias` so that on `samples` [S, T] (token ids) the fraction of
    all tokens taking recursion r is targets[r-1] (default: the capacities (Nr - r + 1) / Nr).

    Recursion by recursion (the scores entering recursion r depend on the biases of the earlier
    recursions only), the bias is solved exactly, as the limit of a bisection would be: with k the
    target count, the cut falls midway between the k-th and (k+1)-th largest raw scores of the
    tokens that took r - 1. Returns the biases (entry 0, recursion 1, is always taken: 0)."""
    mor = model.config.mor
    if mor.router != "expert":
        raise ValueError(f"router calibration needs an expert-choice model, got router {mor.router!r}")
    nr = mor.num_recursions
    targets = list(targets or mor.capacities)
    cut = inverse_activation(mor.routing_threshold, mor.router_func)
    bias = [0.0] * nr
    mor.router_bias = bias                              # read by the routing rule: updated in place
    total = samples.numel()
    for r in range(2, nr + 1):
        ref = reference_forward(model, samples)
        took = ref.selected[r - 2] if len(ref.selected) >= r - 1 else None
        if took is None or not took.any():
            break                                       # nobody reached recursion r - 1
        ranked = ref.router_logits[r - 1][took].float().sort(descending=True).values
        k = min(ranked.numel(), round(targets[r - 1] * total))
        if k == 0:
            score = float(ranked[0]) + 1.0
        elif k == ranked.numel():
            score = float(ranked[-1]) - 1.0
        else:
            score = 0.5 * (float(ranked[k - 1]) + float(ranked[k]))
        bias[r - 1] = cut - score
    return list(bias)


def depth_fractions(tokens_per_depth: list[int]) -> list[float]:
    """Fraction of tokens that took each recursion (depth 1 = every token that entered the block)."""
    first = tokens_per_depth[0] if tokens_per_depth else 0
    return [t / first if first else 0.0 for t in tokens_per_depth]
