"""OpenAI / vLLM request and response schemas (pydantic), field for field. Every numeric field
carries its bounds in the schema (so the OpenAPI document says what is accepted); `SamplingParams`
checks them again for offline users. vLLM fields morserve does not implement are declared with the
one value that means "off" (`Unsupported`): any other value is a 400 naming the field. Unknown
fields are ignored, as vLLM does. `return_depths` is morserve's extension:
`depths[i]` is the recursion depth of the position that produced generated token i (for the
first token, the last prompt position); `max_depth`, `router_threshold` and
`allow_depth_reduction` set the request's depth (engine/depth.py); docs/api.md lists every field."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ValidationInfo, WrapValidator

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from morserve.engine.sampling_params import ParamError, SamplingParams
from morserve.engine.structured import StructuredOutputsParams

LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = SamplingParams.MAX_LOGPROBS


def _integral(value: Any) -> Any:
    """JSON Schema counts 2.0 as an integer: take it as 2 (strict ints refuse every other float)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]
Count = Annotated[Int, Field(ge=0, le=LONG_MAX)]
Logprobs = Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)]
TokenId = Annotated[Int, Field(ge=0, le=2**31 - 1)]           # no vocabulary is larger
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Bias = Annotated[float, Field(ge=-SamplingParams.MAX_LOGIT_BIAS, le=SamplingParams.MAX_LOGIT_BIAS)]
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
MIN_TEMPERATURE = 1e-2          # as vLLM: 0 < temperature < 0.01 is raised to 0.01 (numerics)
MIN_REPETITION_PENALTY = 1e-2   # smaller ones overflow the penalized logits to inf (NaN probabilities)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def response_id(prefix: str, request_id: str | None) -> str:
    """The response id: from the client's `request_id` (as vLLM), else random."""
    return f"{prefix}-{request_id}" if request_id else random_id(prefix)


def now() -> int:
    return int(time.time())


def _without_none(value: Any) -> bool:
    return value is None


DEPTHS_DESCRIPTION = ("depths[i] is the recursion depth of the position that produced generated token i "
                      "(for the first token, the last prompt position)")


def _is(value: Any, off: Any) -> bool:
    """`value` is `off` as JSON sees it (0 is not false, 1 is 1.0)."""
    if off is None or isinstance(off, bool):
        return value is off
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == off


def Unsupported(off: Any) -> Any:             # noqa: N802 - a type constructor
    """A vLLM field morserve does not implement: only `off` (its default) is accepted."""
    def only_off(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        if not _is(value, off):
            raise PydanticCustomError("unsupported", "{field} is not supported by morserve (got {got})",
                                      {"field": info.field_name, "got": repr(value)[:60]})
        return handler(value)
    return Annotated[Literal[off], WrapValidator(only_off)]


class RequestModel(BaseModel):
    """Strict types (no "1" for 1, no 0 for false): what the schema says is what is accepted."""

    model_config = ConfigDict(extra="ignore", strict=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests -------------------------------------------------------------------------------
class StreamOptions(RequestModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(RequestModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(RequestModel):
    """vLLM's `structured_outputs`: one of json, regex, choice, grammar, json_object. There is one
    backend (xgrammar), so `disable_fallback` holds already; its strict JSON mode closes objects
    without `additionalProperties`, which is what `disable_additional_properties` asks."""

    model_config = ConfigDict(extra="forbid")
    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Unsupported(None) = None
    structural_tag: Unsupported(None) = None


class SamplingRequest(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: Int = Field(1, ge=1, le=SamplingParams.MAX_N)
    best_of: Int | None = Field(None, ge=1, le=SamplingParams.MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: Int | None = Field(None, ge=-1, le=LONG_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: Int | None = Field(None, ge=LONG_MIN, le=LONG_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=2.0)
    ignore_eos: bool = False
    min_tokens: Count = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, Bias] | None = None
    return_token_ids: bool | None = False
    truncate_prompt_tokens: Int | None = Field(None, ge=1, le=LONG_MAX)
    request_id: str | None = Field(None, min_length=1, max_length=256)
    cache_salt: str | None = Field(None, min_length=1, description="prefix-cache blocks are shared only "
                                   "between requests with the same salt")
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    prompt_logprobs: Logprobs | None = None               # (after stream: its check reads stream)
    return_depths: bool = Field(False, description="also return `depths`: " + DEPTHS_DESCRIPTION)
    use_beam_search: Unsupported(False) = False
    length_penalty: Unsupported(1.0) = 1.0
    spaces_between_special_tokens: Unsupported(True) = True
    allowed_token_ids: Unsupported(None) = None
    bad_words: Unsupported(None) = None
    priority: Unsupported(0) = 0
    logits_processors: Unsupported(None) = None
    return_tokens_as_token_ids: Unsupported(None) = None
    kv_transfer_params: Unsupported(None) = None
    vllm_xargs: Unsupported(None) = None
    mm_processor_kwargs: Unsupported(None) = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    guided_decoding_backend: Literal["xgrammar", "auto"] | None = None
    guided_whitespace_pattern: Unsupported(None) = None
    max_depth: int | None = Field(None, ge=1, description="cap on the recursions any token takes (1..Nr)")
    router_threshold: float | None = Field(None, allow_inf_nan=False,
                                           description="expert-choice routing threshold for this request")
    allow_depth_reduction: bool = Field(False, description="let the server's adaptive depth policy lower "
                                                           "this request's depth cap under load")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """The engine's SamplingParams (raises ValueError, a ParamError naming the field)."""
        repetition_penalty = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        if self.best_of not in (None, self.n):
            raise ParamError(f"best_of must equal n ({self.n}) or be unset: morserve returns every sequence it "
                             f"samples, got {self.best_of}", "best_of")
        temperature = 1.0 if self.temperature is None else self.temperature
        if 0.0 < temperature < MIN_TEMPERATURE:
            temperature = MIN_TEMPERATURE
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p, seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=repetition_penalty,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, structured_outputs=structured_outputs,
            logit_bias=self._logit_bias(), max_depth=self.max_depth,
            router_threshold=self.router_threshold, allow_depth_reduction=self.allow_depth_reduction,
            cache_salt=self.cache_salt)

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        try:
            return {int(token): bias for token, bias in self.logit_bias.items()}
        except ValueError:
            raise ParamError(f"logit_bias keys must be token ids, got {list(self.logit_bias)[:5]}",
                             "logit_bias") from None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options can only be set when stream is true")
        return value

    @field_validator("prompt_logprobs")
    @classmethod
    def _no_prompt_logprobs_when_streaming(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and info.data.get("stream"):
            raise ValueError("prompt_logprobs are not available when stream is true")
        return value


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: Count | None = Field(16, description="null: 16, the endpoint's default; 0 only with echo "
                                                     "(the prompt and its logprobs alone)")
    logprobs: Logprobs | None = None
    echo: bool | None = False
    suffix: Unsupported(None) = None
    add_special_tokens: bool = True
    prompt_embeds: Unsupported(None) = None

    @field_validator("max_tokens")
    @classmethod
    def _null_is_the_default(cls, value: int | None) -> int:
        return 16 if value is None else value

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt_message(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One readable error instead of one per union member."""
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("prompt", "prompt must be a non-empty string, a list of them, a non-empty "
                                                "list of token ids (integers >= 0), or a list of them; got {got}",
                                      {"got": repr(value)[:80]}) from None


class TextContentPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessageParam(RequestModel):
    role: str
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None      # an assistant turn's calls, for the template
    tool_call_id: str | None = None                     # a tool turn's answer to this call


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1, le=LONG_MAX, description="null: the rest of the context")
    max_completion_tokens: Int | None = Field(None, ge=1, le=LONG_MAX)
    logprobs: bool | None = False
    top_logprobs: Logprobs | None = 0
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True         # accepted: no reasoning parser, nothing to include or drop
    echo: Unsupported(False) = False
    chat_template: Unsupported(None) = None
    reasoning_effort: Unsupported(None) = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True


class TokenizeCompletionRequest(RequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(RequestModel):
    model: str | None = None
    messages: list[ChatMessageParam] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool | None = False


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[TokenId]


# ---- responses ------------------------------------------------------------------------------
class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(ResponseModel):
    error: ErrorInfo


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0


class CompletionLogProbs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(ResponseModel):
    """vLLM's Logprob, in `prompt_logprobs`."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionResponseChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=_without_none)
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_without_none)
    token_ids: list[int] | None = Field(None, exclude_if=_without_none)
    depths: list[int] | None = Field(None, exclude_if=_without_none, description=DEPTHS_DESCRIPTION)


class GenerationResponse(ResponseModel):
    """What every generation response (and stream chunk) carries; subclasses fix `object`, the
    choices' type and whether usage is required (redefined fields keep their place in the JSON)."""

    id: str
    object: str
    created: int = Field(default_factory=now)
    model: str
    choices: list[Any]
    usage: UsageInfo | None = None


class CompletionResponse(GenerationResponse):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionResponseChoice]


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk; the usage-only last chunk has `choices: []`."""


class FunctionCall(ResponseModel):
    name: str
    arguments: str


class ToolCall(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(ResponseModel):
    name: str | None = Field(None, exclude_if=_without_none)
    arguments: str | None = Field(None, exclude_if=_without_none)


class DeltaToolCall(ResponseModel):
    index: int
    id: str | None = Field(None, exclude_if=_without_none)
    type: Literal["function"] | None = Field(None, exclude_if=_without_none)
    function: DeltaFunctionCall


class ChatMessage(ResponseModel):
    role: str
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionLogProb(ResponseModel):
    token: str
    logprob: float = -9999.0
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(ResponseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatCompletionResponseChoice(ResponseModel):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None
    token_ids: list[int] | None = Field(None, exclude_if=_without_none)
    depths: list[int] | None = Field(None, exclude_if=_without_none, description=DEPTHS_DESCRIPTION)


class ChatCompletionResponse(GenerationResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=_without_none)
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_without_none)


class DeltaMessage(ResponseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = Field(None, exclude_if=_without_none)


class ChatCompletionResponseStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = Field(None, exclude_if=_without_none)
    depths: list[int] | None = Field(None, exclude_if=_without_none, description=DEPTHS_DESCRIPTION)


class ChatCompletionStreamResponse(GenerationResponse):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionResponseStreamChoice]
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_without_none)


class ModelPermission(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("modelperm"))
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=now)
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "morserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class TokenizerInfoResponse(BaseModel):
    """vLLM's /tokenizer_info (what lm-eval's `remote` tokenizer backend reads)."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str


class DetokenizeResponse(ResponseModel):
    prompt: str


class VersionResponse(ResponseModel):
    version: str
