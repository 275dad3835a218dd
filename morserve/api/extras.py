"""vLLM's extra response fields, added to what a formatter built: `prompt_logprobs` (on every
choice of /v1/completions, once on a chat response, as vLLM) and, with `return_token_ids`,
`prompt_token_ids` (same places) and each choice's `token_ids`. In a stream (where vLLM allows no
prompt_logprobs) the prompt's ids come with the first chunk of each choice (of the response, on
chat) and every chunk carries its delta's new token ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel

from morserve.api.logprobs import clamp, token_text
from morserve.api.protocol import PromptLogprob
from morserve.engine import CompletionOutput, RequestOutput
from morserve.engine.outputs import TokenLogprobs
from morserve.tokenizer import Tokenizer

if TYPE_CHECKING:
    from morserve.api.generation import ChoiceDelta


def prompt_logprobs(tokenizer: Tokenizer | None, entries: list[TokenLogprobs | None]) -> list[dict | None]:
    """vLLM's shape: per prompt position None (the first) or {token id: {logprob, rank, decoded_token}}
    over the top alternatives and the prompt's own token (rank: place among those reported)."""
    out: list[dict | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)
        out.append({str(t): PromptLogprob(logprob=clamp(lp), rank=rank, decoded_token=token_text(tokenizer, t))
                    for rank, (t, lp) in enumerate(ranked, 1)})
    return out


@dataclass
class ResponseExtras:
    tokenizer: Tokenizer | None
    n: int
    prompt_logprobs: bool
    token_ids: bool
    per_choice: bool                 # completions: on every choice; chat: once on the response
    generated: bool = True           # False for echo with max_tokens 0: no output tokens to report
    _prompt_sent: set[int] = field(default_factory=set)

    def _output_ids(self, comp: CompletionOutput, start: int = 0) -> list[int]:
        return comp.token_ids[start:] if self.generated else []

    def response(self, response: BaseModel, outputs: list[RequestOutput]) -> None:
        for choice in response.choices:
            prompt_idx, seq = divmod(choice.index, self.n) if self.per_choice else (0, choice.index)
            out = outputs[prompt_idx]
            if self.token_ids:
                choice.token_ids = self._output_ids(next(c for c in out.outputs if c.index == seq))
            target = choice if self.per_choice else response
            if self.token_ids:
                target.prompt_token_ids = list(out.prompt_token_ids)
            if self.prompt_logprobs:
                target.prompt_logprobs = prompt_logprobs(self.tokenizer, out.prompt_logprobs or [])

    def chunk(self, chunk: BaseModel, delta: ChoiceDelta) -> None:
        if not self.token_ids:
            return
        for choice in chunk.choices:
            choice.token_ids = self._output_ids(delta.completion, delta.start)
        key = delta.index if self.per_choice else 0
        if key not in self._prompt_sent:
            self._prompt_sent.add(key)
            target = chunk.choices[0] if self.per_choice else chunk
            target.prompt_token_ids = list(delta.output.prompt_token_ids)
