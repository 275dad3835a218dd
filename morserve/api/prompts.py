"""Prompts as the engine takes them (token ids), and the checks that turn every request the
engine would refuse, or could not survive, into a 400 before anything starts."""

from __future__ import annotations

from dataclasses import dataclass

from morserve.api.errors import APIError, bad_request
from morserve.engine import AsyncLLMEngine, SamplingParams
from morserve.engine.depth import check_depth_params


@dataclass
class EnginePrompt:
    token_ids: list[int]
    text: str | None = None        # the prompt as the client sent it, when it was text


def check_prompt(engine: AsyncLLMEngine, ids: list[int]) -> list[int]:
    """400 for an empty prompt or a token id outside the vocabulary."""
    if not ids:
        raise APIError(400, "prompt is empty", param="prompt")
    vocab = engine.model_config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"prompt token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
    return ids


def check_fits(engine: AsyncLLMEngine, prompts: list[EnginePrompt], params: SamplingParams) -> None:
    """400 naming the numbers when a prompt (plus max_tokens) does not fit the context, a stop token
    id is outside the vocabulary, min_tokens would ban every token (EOS + stop ids), or a depth
    override is out of the model's range."""
    limit, vocab = engine.max_model_len, engine.model_config.vocab_size
    try:
        check_depth_params(params, engine.model_config.mor)
    except ValueError as exc:
        raise bad_request(exc) from None
    bad_stops = [t for t in params.stop_token_ids if t >= vocab]
    if bad_stops:
        raise APIError(400, f"stop_token_ids must be in [0, {vocab}), got {bad_stops[:5]}", param="stop_token_ids")
    eos = engine.tokenizer.eos_token_ids if engine.tokenizer is not None else engine.model_config.eos_token_ids
    banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
    if params.min_tokens and len(banned) >= vocab:
        raise APIError(400, "with min_tokens > 0, stop_token_ids and EOS may not cover the whole vocabulary",
                       param="stop_token_ids")
    for p in prompts:
        n = len(p.token_ids)
        if params.max_tokens is None and n >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your "
                                f"request has {n} input tokens. Please reduce the length of the input.")
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} in the "
                                f"completion). Please reduce the length of the prompt or max_tokens.",
                           param="max_tokens")
