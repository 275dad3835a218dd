"""Turns one sequence's logits into its next token: penalties, min_tokens, temperature, top-k,
top-p, min-p, then greedy or a draw from the sequence's own generator. Every operation is on that
row alone, so a seeded request samples the same tokens whatever else shares its batch."""

from __future__ import annotations

import torch

from morserve.engine.outputs import TokenLogprobs
from morserve.engine.sampling_params import SamplingParams


def top_logprobs(logprobs: torch.Tensor, chosen: int, num: int) -> TokenLogprobs:
    """{token: logprob} for the top `num` tokens plus the chosen one."""
    out: TokenLogprobs = {}
    if num > 0:
        values, ids = logprobs.topk(num)
        out.update(zip(ids.tolist(), values.tolist()))
    out[chosen] = float(logprobs[chosen])
    return out


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty,
                                       vals * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=logits.numel())
        logits -= params.frequency_penalty * counts.to(logits.dtype)
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def truncate(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Zero out tokens excluded by top-k, top-p and min-p (probs sum to 1 on input)."""
    if params.top_k > 0 and params.top_k < probs.numel():
        kth = probs.topk(params.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if params.min_p > 0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, torch.zeros_like(probs))
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        drop = (cum - sorted_p) > params.top_p * cum[-1]
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return probs


def sample_token(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                 output_ids: list[int], banned: list[int], generator: torch.Generator | None
                 ) -> tuple[int, TokenLogprobs | None, float]:
    """logits [V] float32 (raw model output) -> (token, logprobs entry or None, chosen logprob).
    `banned` tokens (EOS / stop ids before min_tokens) are never chosen."""
    raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
    x = apply_penalties(logits.float().clone(), params, prompt_ids, output_ids)
    if banned:
        x[torch.tensor(banned, dtype=torch.long)] = float("-inf")
    if params.greedy:
        token = int(x.argmax())
    else:
        probs = truncate(torch.softmax(x / params.temperature, dim=-1), params)
        token = int(torch.multinomial(probs, 1, generator=generator))
    entry = top_logprobs(raw_logprobs, token, params.logprobs) if params.logprobs is not None else None
    return token, entry, float(raw_logprobs[token])
