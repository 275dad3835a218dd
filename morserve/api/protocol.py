"""OpenAI / vLLM request and response schemas (pydantic), field for field where we support the
feature. Requests ignore unknown fields, as vLLM does; value ranges are checked by
`SamplingParams` (its ValueError becomes a 400). morserve's extensions: `return_depths` (the
recursion depth of every generated token), `max_depth`, `router_threshold` and
`allow_depth_reduction` (per-request depth, see engine/depth.py)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from morserve.engine.sampling_params import SamplingParams

LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
TokenId = Annotated[StrictInt, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
MIN_TEMPERATURE = 1e-2          # as vLLM: 0 < temperature < 0.01 is raised to 0.01 (numerics)
MIN_REPETITION_PENALTY = 1e-2   # smaller ones overflow the penalized logits to inf (NaN probabilities)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _without_none(value: Any) -> bool:
    return value is None


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests -------------------------------------------------------------------------------
class StreamOptions(RequestModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class SamplingRequest(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(None, ge=LONG_MIN, le=LONG_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    return_depths: bool = False
    max_depth: StrictInt | None = None
    router_threshold: float | None = None
    allow_depth_reduction: bool = False

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's SamplingParams (raises ValueError naming a bad value)."""
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        repetition_penalty = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        if not MIN_REPETITION_PENALTY <= repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, 2], got {repetition_penalty}")
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
            skip_special_tokens=self.skip_special_tokens, max_depth=self.max_depth,
            router_threshold=self.router_threshold, allow_depth_reduction=self.allow_depth_reduction)


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None

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
    type: str
    text: str | None = None


class ChatMessageParam(RequestModel):
    role: str
    content: str | list[TextContentPart] | None = None
    name: str | None = None


class ResponseFormat(RequestModel):
    type: str = "text"


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    add_generation_prompt: bool = True
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


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


class CompletionResponseChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    depths: list[int] | None = Field(None, exclude_if=_without_none)


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


class ChatMessage(ResponseModel):
    role: str
    content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


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
    depths: list[int] | None = Field(None, exclude_if=_without_none)


class ChatCompletionResponse(GenerationResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(ResponseModel):
    role: str | None = None
    content: str | None = None


class ChatCompletionResponseStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    depths: list[int] | None = Field(None, exclude_if=_without_none)


class ChatCompletionStreamResponse(GenerationResponse):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionResponseStreamChoice]


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
