"""Tool calling. `tool_choice` "required" or a named function is enforced through structured outputs,
whatever the model (vLLM's approach): a named function's output is its arguments object (schema =
the function's parameters); "required" produces a JSON array of {"name", "parameters"} objects, one
per call, each name one of the tools' (at most one call with `parallel_tool_calls: false`). "auto"
needs a tool-call format in the model's chat template: the Hermes / Qwen format,
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks in free text; without one it is a
400 that says so. "none" (the default without tools) is plain text.

A `ToolCallParser` per choice turns the generated text into tool calls: fed the text as it streams,
it returns the content that is plain text and OpenAI tool-call deltas (index, id, type, function
name, arguments); at the end it holds the message's `tool_calls`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from morserve.api.errors import APIError
from morserve.api.protocol import (
    ChatCompletionRequest,
    ChatTool,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
)
from morserve.api.structured import Constraint
from morserve.engine.structured import StructuredOutputsParams
from morserve.tokenizer import Tokenizer

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolMode:
    """How the request's tools are used: "named" (that function), "required" or "auto"."""

    choice: str
    tools: tuple[ChatTool, ...]
    name: str | None = None
    parallel: bool = True              # "required": more than one call allowed


def tool_mode(body: ChatCompletionRequest, tokenizer: Tokenizer | None) -> ToolMode | None:
    """The request's tool mode, None for plain text; 400 for an inconsistent request."""
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if body.tools else "none"
    if choice == "none":
        return None
    if not body.tools:
        raise APIError(400, "tool_choice other than 'none' needs tools", param="tool_choice")
    tools = tuple(body.tools)
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, f"tool function names must be unique, got {names}", param="tools")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not among the "
                                f"tools ({', '.join(names)})", param="tool_choice")
        return ToolMode("named", tools, choice.function.name, parallel=False)
    if choice == "auto" and not template_has_tool_calls(tokenizer):
        raise APIError(400, "tool_choice 'auto' needs a tool-call format in the model's chat template "
                            f"(Hermes {HERMES_OPEN} blocks), and this model's has none: use tool_choice "
                            "'required' or a named function (enforced by structured outputs)", param="tool_choice")
    return ToolMode(choice, tools, parallel=body.parallel_tool_calls is not False)


def template_has_tool_calls(tokenizer: Tokenizer | None) -> bool:
    template = tokenizer.chat_template if tokenizer is not None else None
    return bool(template) and HERMES_OPEN in template


def _parameters(tool: ChatTool) -> dict:
    return tool.function.parameters or EMPTY_PARAMETERS


def _shared_defs(tools: tuple[ChatTool, ...]) -> dict:
    """The tools' `$defs`, merged for the array schema (400 if two define one name differently)."""
    defs: dict = {}
    for tool in tools:
        for name, schema in _parameters(tool).get("$defs", {}).items():
            if name in defs and defs[name] != schema:
                raise APIError(400, f"tools define $defs {name!r} differently", param="tools")
            defs[name] = schema
    return defs


def tool_constraint(mode: ToolMode | None) -> Constraint | None:
    """The structured-output constraint that enforces the mode (none for "auto")."""
    if mode is None or mode.choice == "auto":
        return None
    if mode.choice == "named":
        tool = next(t for t in mode.tools if t.function.name == mode.name)
        return Constraint(StructuredOutputsParams(json=_parameters(tool)), "tools")
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": _parameters(t)},
         "required": ["name", "parameters"]} for t in mode.tools]}}
    if not mode.parallel:
        schema["maxItems"] = 1
    defs = _shared_defs(mode.tools)
    if defs:
        schema["$defs"] = defs
    return Constraint(StructuredOutputsParams(json=schema), "tools")


@dataclass
class ToolCallParser:
    """One choice's text -> content + tool calls (see the module docstring)."""

    mode: ToolMode
    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    _buffer: str = ""
    _pos: int = 0                  # parsed up to here in _buffer

    def feed(self, text: str, final: bool = False) -> tuple[str, list[DeltaToolCall]]:
        """New text in -> (plain-text content to emit, tool-call deltas to emit)."""
        self._buffer += text
        if self.mode.choice == "named":
            return "", self._named(text)
        if self.mode.choice == "required":
            return "", self._array_items()
        content, deltas = self._hermes(final)
        self.content += content
        return content, deltas

    def _new_call(self, name: str, arguments: str) -> DeltaToolCall:
        call = ToolCall(function=FunctionCall(name=name, arguments=arguments))
        self.calls.append(call)
        return DeltaToolCall(index=len(self.calls) - 1, id=call.id, type="function",
                             function=DeltaFunctionCall(name=name, arguments=arguments))

    def _named(self, text: str) -> list[DeltaToolCall]:
        if not self.calls:
            return [self._new_call(self.mode.name, text)]
        self.calls[0].function.arguments += text
        return [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))] if text else []

    def _array_items(self) -> list[DeltaToolCall]:
        """Each array element as soon as it is complete (an object cannot be extended once parsed)."""
        deltas = []
        decoder = json.JSONDecoder()
        while True:
            rest = self._buffer[self._pos:]
            skip = len(rest) - len(rest.lstrip(" \t\n\r[,"))
            start = self._pos + skip
            try:
                item, end = decoder.raw_decode(self._buffer, start)
            except ValueError:
                return deltas
            self._pos = end
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                arguments = json.dumps(item.get("parameters", {}), ensure_ascii=False)
                deltas.append(self._new_call(item["name"], arguments))

    def _hermes(self, final: bool) -> tuple[str, list[DeltaToolCall]]:
        """Plain text up to `<tool_call>` (a tail that may start one is held back), then each block
        as one call once `</tool_call>` closes it."""
        content, deltas = [], []
        while True:
            rest = self._buffer[self._pos:]
            at = rest.find(HERMES_OPEN)
            if at < 0:
                keep = 0 if final else _partial_suffix(rest, HERMES_OPEN)
                content.append(rest[:len(rest) - keep])
                self._pos += len(rest) - keep
                return "".join(content), deltas
            content.append(rest[:at])
            close = rest.find(HERMES_CLOSE, at)
            if close < 0:
                self._pos += at
                if final:                      # an unclosed block stays text
                    content.append(rest[at:])
                    self._pos = len(self._buffer)
                return "".join(content), deltas
            block = rest[at + len(HERMES_OPEN):close]
            self._pos += close + len(HERMES_CLOSE)
            call = _hermes_call(block)
            if call is None:
                content.append(rest[at:close + len(HERMES_CLOSE)])
            else:
                deltas.append(self._new_call(*call))

    def message_content(self) -> str | None:
        """The message's content once every token is in: None when the output was tool calls."""
        if self.mode.choice == "auto":
            return (self.content.strip() or None) if self.calls else self.content
        return None if self.calls else self._buffer


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _hermes_call(block: str) -> tuple[str, str] | None:
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def finish_reason(parser: ToolCallParser | None, reason: str | None) -> str | None:
    """"tool_calls" for an output that ended normally in tool calls."""
    return "tool_calls" if parser is not None and parser.calls and reason == "stop" else reason

