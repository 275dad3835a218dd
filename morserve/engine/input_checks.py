"""The checks a request passes before the engine takes it, in one place: `LLMEngine.add_request`
runs them, and the API server runs the same ones before admitting a request, so a refusal is a 400
naming the field rather than a failed stream. Every refusal is a `ParamError` (a ValueError that
names the field); value ranges that need no model are `SamplingParams.validate`'s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from morserve.engine.sampling_params import ParamError, SamplingParams

# A text of n characters tokenizes to at least n / (longest token, in characters) tokens; the
# slack covers normalizers that compose characters (NFC), so a prompt past the bound is too long
# for the context whatever its content, and is refused without tokenizing it.
CHARS_SLACK = 2


@dataclass(frozen=True)
class EngineLimits:
    """What the checks need to know about one engine."""

    vocab_size: int
    max_model_len: int
    eos_ids: frozenset[int]
    num_pages: int
    worst_pages: Callable[[int], int]        # KV pages a sequence of this many tokens may need
    max_token_chars: int | None = None       # longest token's text (None: no tokenizer)


def check_token_ids(ids: list, limits: EngineLimits, param: str = "prompt") -> list[int]:
    """`ids` if every one is an integer token id of the vocabulary."""
    vocab = limits.vocab_size
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
    if bad:
        raise ParamError(f"{param} token ids must be integers in [0, {vocab}), got {bad[:5]}", param)
    return ids


def check_text_length(num_chars: int, limits: EngineLimits, param: str = "prompt") -> None:
    """Refuse, before tokenizing it, a text too long to fit the context in any tokenization."""
    if limits.max_token_chars is None:
        return
    bound = limits.max_model_len * limits.max_token_chars * CHARS_SLACK
    if num_chars > bound:
        raise ParamError(f"{param} has {num_chars} characters: more than the model's context of "
                         f"{limits.max_model_len} tokens can hold (at most {bound} characters). Please reduce "
                         f"the length of the input.", param)


def prompt_token_ids(prompt: str | list[int], tokenizer, limits: EngineLimits) -> tuple[str | None, list[int]]:
    """(text, token ids) of a prompt given as text (tokenized, BOS as the model wants) or as ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ParamError("this model has no tokenizer: pass the prompt as token ids", "prompt")
        check_text_length(len(prompt), limits)
        ids, text = tokenizer.encode(prompt, add_special_tokens=True), prompt
    else:
        ids, text = check_token_ids(list(prompt), limits), None
    if not ids:
        raise ParamError("prompt is empty", "prompt")
    return text, ids


def banned_ids(params: SamplingParams, limits: EngineLimits) -> list[int]:
    """Tokens that may not be sampled before min_tokens: EOS (unless ignore_eos) and stop ids."""
    ids = set(params.stop_token_ids) | (set() if params.ignore_eos else limits.eos_ids)
    return sorted(t for t in ids if t < limits.vocab_size)


def check_request(ids: list[int], params: SamplingParams, limits: EngineLimits) -> int:
    """Refuse what the engine could not serve for this prompt; returns the max_tokens to use (the
    rest of the context when params.max_tokens is None). Out-of-vocabulary stop token ids are
    accepted: they can never be generated."""
    n, limit = len(ids), limits.max_model_len
    if not ids:
        raise ParamError("prompt is empty", "prompt")
    if n >= limit:
        raise ParamError(f"This model's maximum context length is {limit} tokens (max_model_len). However, "
                         f"your prompt has {n} tokens, leaving no room for output. Please reduce the length "
                         f"of the prompt.", "prompt")
    max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
    if n + max_tokens > limit:
        raise ParamError(f"This model's maximum context length is {limit} tokens. However, you requested "
                         f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion), which "
                         f"exceeds the model's context of {limit} tokens. Please reduce the length of the "
                         f"prompt or max_tokens.", "max_tokens")
    if params.min_tokens > max_tokens:
        raise ParamError(f"min_tokens ({params.min_tokens}) must be <= max_tokens ({max_tokens}, what the "
                         f"context leaves)", "min_tokens")
    worst = limits.worst_pages(n + max_tokens)
    if worst > limits.num_pages:
        raise ParamError(f"prompt + max_tokens = {n + max_tokens} tokens may need {worst} KV pages, more than "
                         f"the whole cache ({limits.num_pages})", "max_tokens")
    if params.min_tokens and len(banned_ids(params, limits)) >= limits.vocab_size:
        raise ParamError(f"min_tokens={params.min_tokens} would ban every token: EOS and stop_token_ids "
                         f"cover the whole vocabulary ({limits.vocab_size} tokens)", "stop_token_ids")
    if params.logit_bias:
        check_token_ids(list(params.logit_bias), limits, "logit_bias")
    return max_tokens
