"""Engine logprob entries ({token_id: logprob} per position) in the two OpenAI shapes: the legacy
completions one (tokens, token_logprobs, top_logprobs, text_offset) and the chat one (content: a
list of {token, logprob, bytes, top_logprobs}). Non-finite logprobs become -9999.0 (as vLLM), so
the JSON stays valid."""

from __future__ import annotations

import math
from collections.abc import Sequence

from morserve.api.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    CompletionLogProbs,
)
from morserve.engine.outputs import TokenLogprobs
from morserve.tokenizer import Tokenizer

FLOOR = -9999.0


def clamp(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > FLOOR else FLOOR


def token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    return tokenizer.id_to_token(token_id) if tokenizer is not None else f"token_id:{token_id}"


def completion_logprobs(tokenizer: Tokenizer | None, token_ids: Sequence[int],
                        entries: Sequence[TokenLogprobs | None], initial_offset: int = 0) -> CompletionLogProbs:
    """Legacy shape; an entry of None (the first prompt token: no context) gives null logprobs."""
    out = CompletionLogProbs()
    offset = initial_offset
    for token, entry in zip(token_ids, entries):
        text = token_text(tokenizer, token)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            out.token_logprobs.append(clamp(entry[token]))
            out.top_logprobs.append({token_text(tokenizer, t): clamp(lp) for t, lp in entry.items()})
    return out


def _chat_entry(tokenizer: Tokenizer | None, token: int, logprob: float) -> ChatCompletionLogProb:
    text = token_text(tokenizer, token)
    return ChatCompletionLogProb(token=text, logprob=clamp(logprob), bytes=list(text.encode("utf-8")))


def chat_logprobs(tokenizer: Tokenizer | None, token_ids: Sequence[int], entries: Sequence[TokenLogprobs],
                  num_top: int) -> ChatCompletionLogProbs:
    content = []
    for token, entry in zip(token_ids, entries):
        chosen = _chat_entry(tokenizer, token, entry[token])
        top = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:num_top]
        content.append(ChatCompletionLogProbsContent(
            **chosen.model_dump(), top_logprobs=[_chat_entry(tokenizer, t, lp) for t, lp in top]))
    return ChatCompletionLogProbs(content=content)
