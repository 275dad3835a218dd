"""POST /v1/chat/completions: messages (and tools) through the model's chat template, then the same
generation and streaming as completions, answered as assistant messages / deltas; with tools, the
output becomes `tool_calls` (tools.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response

from morserve.api.errors import APIError, bad_request
from morserve.api.extras import ResponseExtras
from morserve.api.generation import GENERATION_RESPONSES, ChoiceDelta, respond
from morserve.api.logprobs import chat_logprobs
from morserve.api.prompts import check_fits, check_messages_length, text_prompt
from morserve.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatMessageParam,
    DeltaMessage,
    UsageInfo,
    response_id,
)
from morserve.api.state import get_state
from morserve.api.structured import check_constraint, one_constraint, request_constraints
from morserve.api.tools import ToolCallParser, ToolMode, finish_reason, tool_constraint, tool_mode
from morserve.engine import AsyncLLMEngine, CompletionOutput, RequestOutput
from morserve.tokenizer import Tokenizer

router = APIRouter()


def _conversation(messages: list[ChatMessageParam]) -> list[dict]:
    conversation = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, "only text content parts ({'type': 'text', 'text': ...}) are supported",
                               param="messages")
            content = "\n".join(part.text for part in content)
        message = {"role": m.role, "content": content or ""}
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        if m.tool_calls is not None:
            message["tool_calls"] = [_template_tool_call(call) for call in m.tool_calls]
        conversation.append(message)
    return conversation


def _template_tool_call(call: dict) -> dict:
    """An earlier turn's tool call as templates read it (as vLLM passes it): the OpenAI
    `function.arguments` JSON string parsed into an object when it is one."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def chat_prompt_text(engine: AsyncLLMEngine, model: str, messages: list[ChatMessageParam],
                     add_generation_prompt: bool, tools: list[dict] | None = None,
                     continue_final_message: bool = False, template_kwargs: dict | None = None) -> str:
    """The messages (and tools, for templates that show them) rendered by the model's chat
    template (400 when it has none or it fails). `continue_final_message` leaves the last message
    open (the text ends right after its content: the model continues it), as Hugging Face does;
    `template_kwargs` reach the template as variables (vLLM's documents / chat_template_kwargs)."""
    tokenizer = engine.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        raise APIError(400, f"the model `{model}` has no chat template: use /v1/completions with a plain prompt",
                       param="messages")
    conversation = _conversation(messages)
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                             **{**(template_kwargs or {}), "tools": tools})
    except APIError:
        raise
    except Exception as exc:       # the template runs on client data: any failure is the request's
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
    return _open_final_message(text, conversation[-1]["content"]) if continue_final_message else text


def _open_final_message(text: str, final: str) -> str:
    """`text` cut right after the last occurrence of the final message's content."""
    for content in (final, final.strip()):
        at = text.rfind(content) if content else -1
        if at >= 0:
            return text[: at + len(content)]
    raise APIError(400, "continue_final_message: the chat template does not show the final message's content "
                        "as it is, so it cannot be left open", param="continue_final_message")


@dataclass
class ChatFormatter:
    request_id: str
    model: str
    tokenizer: Tokenizer | None
    num_choices: int
    top_logprobs: int | None
    return_depths: bool
    tools: ToolMode | None = None
    _parsers: dict[int, ToolCallParser] = field(default_factory=dict)

    def _parser(self, index: int) -> ToolCallParser | None:
        if self.tools is None:
            return None
        return self._parsers.setdefault(index, ToolCallParser(self.tools))

    def _logprobs(self, comp: CompletionOutput, start: int):
        if self.top_logprobs is None:
            return None
        return chat_logprobs(self.tokenizer, comp.token_ids[start:], (comp.logprobs or [])[start:], self.top_logprobs)

    def _depths(self, comp: CompletionOutput, start: int) -> list[int] | None:
        return comp.depths[start:] if self.return_depths else None

    def stream_prefix(self) -> list[ChatCompletionStreamResponse]:
        return [ChatCompletionStreamResponse(id=self.request_id, model=self.model, choices=[
            ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            for i in range(self.num_choices)]

    def stream_chunk(self, d: ChoiceDelta) -> ChatCompletionStreamResponse:
        parser = self._parser(d.index)
        if parser is None:
            delta = DeltaMessage(content=d.text)
        else:
            content, calls = parser.feed(d.text, final=d.finish_reason is not None)
            delta = DeltaMessage(content=content or None, tool_calls=calls or None)
        choice = ChatCompletionResponseStreamChoice(
            index=d.index, delta=delta, logprobs=self._logprobs(d.completion, d.start),
            finish_reason=finish_reason(parser, d.finish_reason), stop_reason=d.stop_reason,
            depths=self._depths(d.completion, d.start))
        return ChatCompletionStreamResponse(id=self.request_id, model=self.model, choices=[choice])

    def usage_chunk(self, usage: UsageInfo) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(id=self.request_id, model=self.model, choices=[], usage=usage)

    def _message(self, comp: CompletionOutput) -> tuple[ChatMessage, str | None]:
        parser = self._parser(comp.index)
        if parser is None:
            return ChatMessage(role="assistant", content=comp.text), comp.finish_reason
        parser.feed(comp.text, final=True)
        message = ChatMessage(role="assistant", content=parser.message_content(), tool_calls=parser.calls)
        return message, finish_reason(parser, comp.finish_reason)

    def response(self, outputs: list[RequestOutput], usage: UsageInfo) -> ChatCompletionResponse:
        choices = []
        for comp in (comp for out in outputs for comp in out.outputs):   # one prompt: index = sequence index
            message, reason = self._message(comp)
            choices.append(ChatCompletionResponseChoice(
                index=comp.index, message=message, logprobs=self._logprobs(comp, 0), finish_reason=reason,
                stop_reason=comp.stop_reason, depths=self._depths(comp, 0)))
        return ChatCompletionResponse(id=self.request_id, model=self.model, choices=choices, usage=usage)


def _check_supported(body: ChatCompletionRequest) -> None:
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.continue_final_message and body.add_generation_prompt and "add_generation_prompt" in body.model_fields_set:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                       param="continue_final_message")


def _template_kwargs(body: ChatCompletionRequest) -> dict:
    return {**(body.chat_template_kwargs or {}), **({"documents": body.documents} if body.documents else {})}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=GENERATION_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
    state = get_state(raw)
    engine = state.ready_engine()
    model = state.check_model(body.model)
    _check_supported(body)
    check_messages_length(engine, body.messages)
    tools = tool_mode(body, engine.tokenizer)
    constraint = one_constraint(request_constraints(body) + [c for c in [tool_constraint(tools)] if c is not None])
    structured = await check_constraint(engine, constraint)
    tool_dicts = [t.model_dump(exclude_none=True) for t in tools.tools] if tools is not None else None
    add_generation_prompt = body.add_generation_prompt and not body.continue_final_message
    text = chat_prompt_text(engine, model, body.messages, add_generation_prompt, tool_dicts,
                            body.continue_final_message, _template_kwargs(body))
    prompts = [await text_prompt(engine, text, body.add_special_tokens, body.truncate_prompt_tokens)]
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    try:
        params = body.sampling_params(max_tokens, top_logprobs, body.prompt_logprobs, structured_outputs=structured)
    except ValueError as exc:
        raise bad_request(exc) from None
    check_fits(engine, prompts, params)
    request_id = response_id("chatcmpl", body.request_id)
    formatter = ChatFormatter(request_id, model, engine.tokenizer, params.n, top_logprobs, body.return_depths, tools)
    extras = ResponseExtras(engine.tokenizer, params.n, params.prompt_logprobs is not None,
                            bool(body.return_token_ids), per_choice=False)
    return await respond(raw, state, prompts, params, request_id, formatter, bool(body.stream), body.stream_options,
                         extras)
