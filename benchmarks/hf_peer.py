"""The external peer of the throughput benchmark: Hugging Face `transformers` `generate` on the same
vanilla model (our weights copied into a LlamaForCausalLM), with the static batching `generate`
offers: requests go in batches of `batch_size`, each batch runs until its longest request is done,
and only the tokens each request asked for count as output."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass

import torch

from morserve.model import MoRModel


def hf_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def to_hf_llama(model: MoRModel):
    """A transformers LlamaForCausalLM holding `model`'s weights (vanilla models only: Nr = 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    if cfg.mor.num_recursions != 1:
        raise ValueError("only a vanilla model (num_recursions = 1) has a Llama twin")
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                         head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                         rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                         tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                         eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    param = next(model.parameters())
    with param.device:                                  # initialise on the device: fast on a GPU
        hf = LlamaForCausalLM(hf_cfg).to(dtype=param.dtype)
    layers = [*model.prologue, *model.block, *model.epilogue]
    state = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    for i, layer in enumerate(layers):
        state.update({f"model.layers.{i}.{k}": v for k, v in layer.state_dict().items()})
    if model.lm_head is not None:
        state["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()


@dataclass
class HFResult:
    output_tokens: int
    finished_requests: int
    seconds: float
    peak_memory: int | None
    partial: bool


@torch.inference_mode()
def run_hf_generate(hf_model, requests: list[tuple[list[int], int]], batch_size: int,
                    time_cap: float | None = None) -> HFResult:
    """Greedy `generate` over `requests` (prompts of one length) in static batches; stops after the
    batch during which `time_cap` seconds passed (then the result is marked partial)."""
    device = hf_model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    tokens = done = 0
    for first in range(0, len(requests), batch_size):
        batch = requests[first: first + batch_size]
        ids = torch.tensor([prompt for prompt, _ in batch], device=device)
        longest = max(n for _, n in batch)
        hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=longest,
                          min_new_tokens=longest, do_sample=False, pad_token_id=0)
        tokens += sum(n for _, n in batch)
        done += len(batch)
        if time_cap is not None and time.perf_counter() - start > time_cap:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return HFResult(tokens, done, seconds, peak, partial=done < len(requests))
