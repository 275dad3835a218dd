"""Llama building blocks: RMSNorm, RoPE (half-rotation layout), GQA attention with one fused q/k/v
projection, SwiGLU with one fused gate/up projection, and the pre-norm decoder layer.

Attention itself is a callback (`AttendFn`): a decoder layer computes projections and RoPE, and
whoever runs the layer decides what the queries see (an explicit-mask dense reference, or the
engine's paged KV cache). That keeps one implementation of the layer math for every path. A
callback whose attribute `fuses_rope` is true applies RoPE itself: it gets un-roped q and k (the
engine fuses RoPE, looked up by position, into its K/V store) and the layer needs no cos/sin.

Fused projections hold one weight per layer (q|k|v rows, gate|up rows) so that each is one GEMM;
checkpoints keep the separate q_proj/k_proj/v_proj/gate_proj/up_proj tensors (`split_in_checkpoints`
splits on `state_dict()` and concatenates on `load_state_dict()`).

The hot ops (RMSNorm, residual add + RMSNorm, silu * up) go through `kernels`: fused Triton kernels
on CUDA, the same math in PyTorch elsewhere. A stack of layers (`run_layers`) hands the residual
stream from layer to layer as (layer output, residual) so every norm after the first is fused with
the residual add before it; the sums are the ones a plain `x + f(x)` layer computes. The stack's
first norm and its final residual add are left to the caller, who fuses them with the row
movement around the stack (a pool gather before, a pool scatter or the final norm after).
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch
from torch import nn

import kernels
from morserve.config import ModelConfig

# (q [..., T, H, D], k [..., T, Hkv, D], v [..., T, Hkv, D]) -> attention output [..., T, H, D]
AttendFn = Callable[..., torch.Tensor]


def split_in_checkpoints(module: nn.Module, fused: str, parts: dict[str, int]) -> None:
    """Store `module.<fused>.weight` (its rows the concatenation of `parts`, name -> rows, in order)
    in state dicts as the separate `<name>.weight` tensors, and concatenate those back on load."""
    key, sizes = fused + ".weight", list(parts.values())

    def split(_module, state, prefix, _metadata) -> None:
        weight = state.pop(prefix + key)
        for name, piece in zip(parts, weight.split(sizes)):
            state[prefix + name + ".weight"] = piece.clone()   # unshared storage (safetensors)

    def join(_module, state, prefix, *_args) -> None:
        names = [prefix + name + ".weight" for name in parts]
        if all(name in state for name in names):
            state[prefix + key] = torch.cat([state.pop(name) for name in names])

    module.register_state_dict_post_hook(split)
    module.register_load_state_dict_pre_hook(join)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.t() (nn.Linear without bias). Float32 inference on the CPU goes through oneDNN
    with the weight reordered once into oneDNN's blocked layout (`_packed`): on the AMD
    development machine that ran the 135M model's decode GEMMs 1.6 - 2.6x faster than torch's
    default MKL sgemm, which repacks the weight on every call (benchmarks/RESULTS.md, 2026-12-02).
    Everything else (other devices and dtypes, autograd) is torch's linear."""
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and _ONEDNN
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, _packed(weight), None, "none", [], "")
    return nn.functional.linear(x, weight)


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_PACK_ROWS = 16      # oneDNN's row-count hint for the layout; any batch size runs on it (measured: 8 - 128 alike)
_PACKED: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}     # id(weight) -> ref, version, data_ptr, packed


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """weight's oneDNN copy, made on first use and again whenever the weight changes (in-place
    update: its version counter; new storage: its data pointer; an inference tensor has no
    counter, only the pointer is checked); dropped with the weight. It costs one more copy of each
    float32 weight used on the CPU."""
    key, version = id(weight), -1 if weight.is_inference() else weight._version   # inference tensors: no counter
    held = _PACKED.get(key)
    if held is not None and held[0]() is weight and held[1:3] == (version, weight.data_ptr()):
        return held[3]
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS)
    _PACKED[key] = (weakref.ref(weight, lambda _ref, key=key: _PACKED.pop(key, None)), version, weight.data_ptr(),
                    packed)
    return packed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(residual + x), residual + x) in one pass."""
        return kernels.add_rmsnorm(x, residual, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim] for the given positions (HF half-rotation layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.qkv_proj = nn.Linear(d, (h + 2 * hkv) * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        split_in_checkpoints(self, "qkv_proj", {"q_proj": h * hd, "k_proj": hkv * hd, "v_proj": hkv * hd})

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                attend: AttendFn) -> torch.Tensor:
        """cos/sin [T, D] of the rows' positions, None when `attend` fuses RoPE."""
        lead = x.shape[:-1]
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = linear(x, self.qkv_proj.weight).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q, k, v = q.unflatten(-1, (h, hd)), k.unflatten(-1, (hkv, hd)), v.unflatten(-1, (hkv, hd))
        if getattr(attend, "fuses_rope", False):
            out = attend(q, k, v)
        else:
            out = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return linear(out.reshape(*lead, h * hd), self.o_proj.weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        f = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * f, bias=False)
        self.down_proj = nn.Linear(f, cfg.hidden_size, bias=False)
        split_in_checkpoints(self, "gate_up_proj", {"gate_proj": f, "up_proj": f})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(kernels.silu_mul(linear(x, self.gate_up_proj.weight)), self.down_proj.weight)


class DecoderLayer(nn.Module):
    """Pre-norm Llama layer over [..., T, d]; the engine passes a flat [T, d] batch whose rows may
    belong to any sequence, the reference a [B, T, d] batch of whole sequences."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def step(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor | None,
             sin: torch.Tensor | None, attend: AttendFn,
             normed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on the residual stream residual + x (x alone when residual is None); returns
        (mlp output, residual), whose sum is the stream after the layer. `normed`: the stream's
        input norm, already computed by the caller (only with residual None)."""
        if normed is not None:
            residual = x
        elif residual is None:
            normed, residual = self.input_layernorm(x), x
        else:
            normed, residual = self.input_layernorm.add_forward(x, residual)
        normed, residual = self.post_attention_layernorm.add_forward(self.self_attn(normed, cos, sin, attend),
                                                                     residual)
        return self.mlp(normed), residual

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: AttendFn) -> torch.Tensor:
        out, residual = self.step(x, None, cos, sin, attend)
        return residual + out


def run_layers(layers: Sequence[DecoderLayer], x: torch.Tensor, attends: Sequence[AttendFn],
               normed: torch.Tensor | None = None, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stream x through `layers` in order (layer i attends with attends[i]; cos/sin as in
    Attention.forward), each norm after the first fused with the residual add before it; returns
    (out, residual) whose sum (out alone when residual is None, i.e. no layers) is what calling
    the layers one by one gives. `normed`: layers[0]'s input norm of x, computed by the caller."""
    residual = None
    for i, (layer, attend) in enumerate(zip(layers, attends, strict=True)):
        x, residual = layer.step(x, residual, cos, sin, attend, normed if i == 0 else None)
    return x, residual
