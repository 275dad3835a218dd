"""Engine construction arguments (vLLM spelling) and how they size the KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from morserve.engine.depth_policy import DepthPolicy

BATCHING_MODES = ("depthwise", "vanilla")


@dataclass
class EngineArgs:
    """`model` is a path or a known name (see morserve.checkpoint.load_pretrained), or an
    already-built MoRModel (then pass `tokenizer` too, or None for token-id prompts only).
    KV capacity: `num_kv_blocks` pages (a page = block_size tokens of K and V for ONE layer), or
    `kv_cache_memory` bytes, or by default `gpu_memory_utilization` of the GPU / 1 GiB on CPU,
    capped at what max_num_seqs sequences of max_model_len tokens could ever use.
    On CUDA, block passes of up to `cuda_graph_max_tokens` tokens replay CUDA graphs captured at
    first use for padded sizes; `enforce_eager` turns that off (vLLM spelling).
    `num_scheduler_steps` > 1 lets greedy decoding run that many ticks per step() with the batch
    state on the device (see decode_loop.py): much less host work per token, tokens arrive in
    bursts of that many. `enable_prefix_caching` shares the KV blocks of common prompt prefixes
    between requests (vLLM's flag; see prefix_cache.py)."""

    model: Any = "morserve-mini-mor3"
    tokenizer: Any = None
    batching: str = "depthwise"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    device: str | None = None
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    max_model_len: int | None = None
    enforce_eager: bool = False
    cuda_graph_max_tokens: int = 512
    num_scheduler_steps: int = 1
    enable_prefix_caching: bool = False
    depth_policy: str = "fixed"
    depth_policy_metric: str = "queue_time"
    depth_policy_target: float = 1.0

    def validate(self) -> None:
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be >= 1 byte, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not isinstance(self.num_scheduler_steps, int) or self.num_scheduler_steps < 1:
            raise ValueError(f"num_scheduler_steps must be a positive integer, got {self.num_scheduler_steps!r}")
        if not isinstance(self.cuda_graph_max_tokens, int) or self.cuda_graph_max_tokens < 0:
            raise ValueError(f"cuda_graph_max_tokens must be an integer >= 0, got {self.cuda_graph_max_tokens!r}")
        DepthPolicy(self.depth_policy, self.depth_policy_metric, self.depth_policy_target, 1)   # raises if bad
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def resolve_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        names = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
                 "float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16, "half": torch.float16}
        if self.dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {self.dtype!r}")
        return names[self.dtype]

    def num_pages(self, page_bytes: int, worst_case_pages: int, device: torch.device) -> int:
        """Pages for the KV pool."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        if self.kv_cache_memory is not None:
            budget = self.kv_cache_memory
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * self.gpu_memory_utilization) - (1 << 30)   # leave room for activations
        else:
            budget = 1 << 30
        pages = max(1, budget // page_bytes)
        return min(pages, self.max_num_seqs * worst_case_pages)
