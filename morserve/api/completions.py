"""POST /v1/completions: text, texts, token ids or lists of token ids in; one choice per
(prompt, i < n) out, with legacy logprobs (echo adds the prompt's, as lm-eval-harness needs) and,
on request, `depths`: for each generated token, the recursion depth of the position that
produced it."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response

from morserve.api.errors import APIError, bad_request
from morserve.api.generation import GENERATION_RESPONSES, ChoiceDelta, respond
from morserve.api.logprobs import completion_logprobs
from morserve.api.prompts import EnginePrompt, check_fits, completion_prompts
from morserve.api.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    UsageInfo,
    random_id,
)
from morserve.api.state import get_state
from morserve.api.structured import check_constraint, one_constraint, request_constraints
from morserve.engine import CompletionOutput, RequestOutput
from morserve.tokenizer import Tokenizer

router = APIRouter()


@dataclass
class CompletionFormatter:
    request_id: str
    model: str
    tokenizer: Tokenizer | None
    prompts: list[EnginePrompt]
    n: int
    echo: bool
    logprobs: bool
    return_depths: bool
    _sent_chars: dict[int, int] = field(default_factory=dict)

    def _prompt_text(self, prompt: EnginePrompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False) if self.tokenizer else ""

    def _choice(self, index: int, prompt_idx: int, out: RequestOutput, comp: CompletionOutput, text: str,
                start: int, finish_reason: str | None, stop_reason: int | str | None) -> CompletionResponseChoice:
        prompt = self.prompts[prompt_idx]
        echo = self.echo and start == 0
        logprobs = None
        if self.logprobs:
            ids, entries = comp.token_ids[start:], (comp.logprobs or [])[start:]
            if echo:
                ids, entries = prompt.token_ids + ids, (out.prompt_logprobs or []) + entries
            logprobs = completion_logprobs(self.tokenizer, ids, entries, self._sent_chars.get(index, 0))
        if echo:
            text = self._prompt_text(prompt) + text
        self._sent_chars[index] = self._sent_chars.get(index, 0) + len(text)
        return CompletionResponseChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason,
                                        stop_reason=stop_reason,
                                        depths=comp.depths[start:] if self.return_depths else None)

    def stream_prefix(self) -> list[CompletionStreamResponse]:
        return []

    def stream_chunk(self, d: ChoiceDelta) -> CompletionStreamResponse:
        choice = self._choice(d.index, d.prompt_idx, d.output, d.completion, d.text, d.start, d.finish_reason,
                              d.stop_reason)
        return CompletionStreamResponse(id=self.request_id, model=self.model, choices=[choice])

    def usage_chunk(self, usage: UsageInfo) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=self.request_id, model=self.model, choices=[], usage=usage)

    def response(self, outputs: list[RequestOutput], usage: UsageInfo) -> CompletionResponse:
        choices = [self._choice(idx * self.n + comp.index, idx, out, comp, comp.text, 0, comp.finish_reason,
                                comp.stop_reason)
                   for idx, out in enumerate(outputs) for comp in out.outputs]
        return CompletionResponse(id=self.request_id, model=self.model, choices=choices, usage=usage)


@router.post("/v1/completions", response_model=CompletionResponse, responses=GENERATION_RESPONSES)
async def create_completion(body: CompletionRequest, raw: Request) -> Response:
    state = get_state(raw)
    engine = state.ready_engine()
    model = state.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompts = await completion_prompts(engine, body.prompt)
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    structured = await check_constraint(engine, one_constraint(request_constraints(body)))
    try:
        params = body.sampling_params(body.max_tokens, body.logprobs, prompt_logprobs, structured_outputs=structured)
    except ValueError as exc:
        raise bad_request(exc) from None
    check_fits(engine, prompts, params)
    request_id = random_id("cmpl")
    formatter = CompletionFormatter(request_id, model, engine.tokenizer, prompts, params.n, bool(body.echo),
                                    body.logprobs is not None, body.return_depths)
    return await respond(raw, state, prompts, params, request_id, formatter, bool(body.stream), body.stream_options)
