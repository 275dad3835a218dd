"""Prompts as the engine takes them (token ids), and the engine's own input checks
(morserve.engine.input_checks) run before anything starts, so every request the engine would
refuse is a 400 naming the field. Text is bounded by its length before it is tokenized (a prompt
too long for the context in any tokenization is refused at once), and tokenized in a worker thread,
so a huge prompt never holds up the event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from morserve.api.errors import APIError
from morserve.engine import AsyncLLMEngine, ParamError, SamplingParams
from morserve.engine.input_checks import check_request, check_text_length, check_token_ids
from morserve.engine.depth import check_depth_params


@dataclass
class EnginePrompt:
    token_ids: list[int]
    text: str | None = None        # the prompt as the client sent it, when it was text


def _refused(exc: ParamError) -> APIError:
    return APIError(400, str(exc), exc.param)


def check_prompt(engine: AsyncLLMEngine, ids: list[int]) -> list[int]:
    """400 for an empty prompt or a token id outside the vocabulary."""
    if not ids:
        raise APIError(400, "prompt is empty", param="prompt")
    try:
        return check_token_ids(ids, engine.limits)
    except ParamError as exc:
        raise _refused(exc) from None


def check_length(engine: AsyncLLMEngine, num_chars: int, param: str) -> None:
    """400 for text too long for the context whatever its tokenization (before tokenizing it)."""
    try:
        check_text_length(num_chars, engine.limits, param)
    except ParamError as exc:
        raise _refused(exc) from None


def _tokenizer(engine: AsyncLLMEngine):
    if engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
    return engine.tokenizer


async def tokenize(engine: AsyncLLMEngine, texts: list[str], add_special_tokens: bool,
                   param: str = "prompt") -> list[list[int]]:
    """Token ids of each text, tokenized in a worker thread after the length bound."""
    tokenizer = _tokenizer(engine)
    check_length(engine, max(map(len, texts), default=0), param)
    return await asyncio.to_thread(lambda: [tokenizer.encode(t, add_special_tokens=add_special_tokens)
                                            for t in texts])


async def text_prompt(engine: AsyncLLMEngine, text: str, add_special_tokens: bool = False,
                      truncate: int | None = None) -> EnginePrompt:
    """One text prompt (a rendered chat, say) as an EnginePrompt (its last `truncate` tokens)."""
    (ids,) = await tokenize(engine, [text], add_special_tokens)
    if truncate is not None:
        return EnginePrompt(check_prompt(engine, ids[-truncate:]))
    return EnginePrompt(check_prompt(engine, ids), text)


async def completion_prompts(engine: AsyncLLMEngine, prompt: str | list, add_special_tokens: bool = True,
                             truncate: int | None = None) -> list[EnginePrompt]:
    """The request's prompts (a text, texts, token ids or lists of them) as token ids; with
    `truncate`, only each prompt's last `truncate` tokens (vLLM's truncate_prompt_tokens)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    texts = [p for p in prompt if isinstance(p, str)]
    encoded = iter(await tokenize(engine, texts, add_special_tokens) if texts else [])
    out = []
    for p in prompt:
        ids = next(encoded) if isinstance(p, str) else list(p)
        if truncate is not None:
            ids = ids[-truncate:]
        out.append(EnginePrompt(check_prompt(engine, ids), p if isinstance(p, str) and truncate is None else None))
    return out


def check_fits(engine: AsyncLLMEngine, prompts: list[EnginePrompt], params: SamplingParams) -> None:
    """The engine's checks of each prompt with these params (context, KV pages, banned tokens,
    logit_bias ids, depth overrides in the model's range), as 400s naming the field."""
    try:
        check_depth_params(params, engine.model_config.mor)
    except ParamError as exc:
        raise _refused(exc) from None
    for p in prompts:
        try:
            check_request(p.token_ids, params, engine.limits)
        except ParamError as exc:
            raise _refused(exc) from None


def check_messages_length(engine: AsyncLLMEngine, messages: list) -> None:
    """The length bound over chat messages' text, before the chat template renders them."""
    def chars(content) -> int:
        if isinstance(content, str):
            return len(content)
        return sum(len(part.text or "") for part in content or [])
    check_length(engine, sum(chars(m.content) for m in messages), "messages")
