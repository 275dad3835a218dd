"""POST /v1/completions: text, texts, token ids or lists of token ids in; one choice per
(prompt, i < n) out, with legacy logprobs (echo adds the prompt's, as lm-eval-harness needs; echo
with max_tokens 0 answers the prompt and its logprobs alone) and, on request, vLLM's
prompt_logprobs / token ids (extras.py) and `depths`: for each generated token, the recursion
depth of the position that produced it."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response

from morserve.api.errors import APIError, bad_request
from morserve.api.extras import ResponseExtras
from morserve.api.generation import GENERATION_RESPONSES, ChoiceDelta, respond
from morserve.api.logprobs import completion_logprobs
from morserve.api.prompts import EnginePrompt, check_fits, completion_prompts
from morserve.api.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    UsageInfo,
    response_id,
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
    prompt_only: bool = False          # echo with max_tokens 0: the one generated token is dropped
    _sent_chars: dict[int, int] = field(default_factory=dict)

    def _prompt_text(self, prompt: EnginePrompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False) if self.tokenizer else ""

    def _choice(self, index: int, prompt_idx: int, out: RequestOutput, comp: CompletionOutput, text: str,
                start: int, finish_reason: str | None, stop_reason: int | str | None) -> CompletionResponseChoice:
        prompt = self.prompts[prompt_idx]
        echo = self.echo and start == 0
        generated = [] if self.prompt_only else comp.token_ids[start:]
        if self.prompt_only:
            text = ""
        logprobs = None
        if self.logprobs:
            ids, entries = generated, (comp.logprobs or [])[start:start + len(generated)]
            if echo:
                ids, entries = prompt.token_ids + ids, (out.prompt_logprobs or []) + entries
            logprobs = completion_logprobs(self.tokenizer, ids, entries, self._sent_chars.get(index, 0))
        if echo:
            text = self._prompt_text(prompt) + text
        self._sent_chars[index] = self._sent_chars.get(index, 0) + len(text)
        return CompletionResponseChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason,
                                        stop_reason=stop_reason,
                                        depths=comp.depths[start:start + len(generated)] if self.return_depths
                                        else None)

    def _usage(self, usage: UsageInfo) -> UsageInfo:
        if not self.prompt_only:
            return usage
        return UsageInfo(prompt_tokens=usage.prompt_tokens, completion_tokens=0, total_tokens=usage.prompt_tokens)

    def stream_prefix(self) -> list[CompletionStreamResponse]:
        return []

    def stream_chunk(self, d: ChoiceDelta) -> CompletionStreamResponse:
        choice = self._choice(d.index, d.prompt_idx, d.output, d.completion, d.text, d.start, d.finish_reason,
                              d.stop_reason)
        return CompletionStreamResponse(id=self.request_id, model=self.model, choices=[choice])

    def usage_chunk(self, usage: UsageInfo) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=self.request_id, model=self.model, choices=[], usage=self._usage(usage))

    def response(self, outputs: list[RequestOutput], usage: UsageInfo) -> CompletionResponse:
        choices = [self._choice(idx * self.n + comp.index, idx, out, comp, comp.text, 0, comp.finish_reason,
                                comp.stop_reason)
                   for idx, out in enumerate(outputs) for comp in out.outputs]
        return CompletionResponse(id=self.request_id, model=self.model, choices=choices, usage=self._usage(usage))


@router.post("/v1/completions", response_model=CompletionResponse, responses=GENERATION_RESPONSES)
async def create_completion(body: CompletionRequest, raw: Request) -> Response:
    state = get_state(raw)
    engine = state.ready_engine()
    model = state.check_model(body.model)
    prompt_only = body.max_tokens == 0
    if prompt_only and not body.echo:
        raise APIError(400, "max_tokens must be >= 1 (0 only with echo: the prompt and its logprobs alone)",
                       param="max_tokens")
    prompts = await completion_prompts(engine, body.prompt, body.add_special_tokens, body.truncate_prompt_tokens)
    prompt_logprobs = body.prompt_logprobs
    if prompt_logprobs is None and body.echo and body.logprobs is not None:
        prompt_logprobs = body.logprobs
    structured = await check_constraint(engine, one_constraint(request_constraints(body)))
    try:
        params = body.sampling_params(1 if prompt_only else body.max_tokens, body.logprobs, prompt_logprobs,
                                      structured_outputs=structured)
    except ValueError as exc:
        raise bad_request(exc) from None
    check_fits(engine, prompts, params)
    request_id = response_id("cmpl", body.request_id)
    formatter = CompletionFormatter(request_id, model, engine.tokenizer, prompts, params.n, bool(body.echo),
                                    body.logprobs is not None, body.return_depths, prompt_only)
    extras = ResponseExtras(engine.tokenizer, params.n, params.prompt_logprobs is not None,
                            bool(body.return_token_ids), per_choice=True, generated=not prompt_only)
    return await respond(raw, state, prompts, params, request_id, formatter, bool(body.stream), body.stream_options,
                         extras)
