"""Per-request sampling parameters (vLLM field names) with validation that names the bad value:
a `ParamError` (a ValueError carrying the field name) for every value the engine cannot use or
represent (integers past int64, non-finite floats, out-of-range values)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from morserve.engine.structured import StructuredOutputsParams

INT64_MAX = 2**63 - 1


class ParamError(ValueError):
    """A request value the engine refuses; `param` names the field (the API's 400 `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """temperature 0 means greedy; top_k <= 0 and top_p = 1 and min_p = 0 mean no truncation.
    seed makes the request's sampling reproducible whatever else is in the batch. logprobs /
    prompt_logprobs: how many top alternatives to report per token (0 = only the chosen token).
    output_kind: `cumulative` (a RequestOutput after every tick that touched the request, for
    streaming) or `final_only` (only the finished one; what offline generation needs).
    logit_bias: {token id: bias in [-100, 100]} added to the logits before sampling.
    structured_outputs: a grammar the output must follow (see structured.py).

    Depth (morserve's extensions, see engine/depth.py): `max_depth` caps the recursions any token
    of the request takes (1..Nr); `router_threshold` replaces the expert-choice routing threshold;
    `allow_depth_reduction` lets a load-adaptive depth policy lower the cap while the server is
    loaded. `cache_salt` (vLLM's field) keeps the request's prefix-cache blocks apart from those of
    requests with another salt (or none). The model-dependent ranges are checked by the engine (`check_depth_params`)."""

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: str = "cumulative"
    max_depth: int | None = None
    router_threshold: float | None = None
    allow_depth_reduction: bool = False
    cache_salt: str | None = None

    OUTPUT_KINDS = ("cumulative", "final_only")

    MAX_LOGPROBS = 20
    MAX_N = 1024                      # sequences one request may ask for
    MAX_LOGIT_BIAS = 100.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ParamError(f"{name} {why}, got {getattr(self, name)!r}", name)

        def int_in(name: str, low: int, high: int, why: str) -> None:
            value = getattr(self, name)
            if not _is_int(value) or not low <= value <= high:
                bad(name, why)

        def number_in(name: str, low: float, high: float, why: str, open_low: bool = False) -> None:
            value = getattr(self, name)
            if not _is_number(value) or not (low < value if open_low else low <= value) or value > high:
                bad(name, why)

        int_in("n", 1, self.MAX_N, f"must be an integer in [1, {self.MAX_N}]")
        if self.max_tokens is not None:
            int_in("max_tokens", 1, INT64_MAX, "must be an integer >= 1")
        int_in("min_tokens", 0, INT64_MAX, "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})", "min_tokens")
        number_in("temperature", 0.0, 100.0, "must be in [0, 100]")
        number_in("top_p", 0.0, 1.0, "must be in (0, 1]", open_low=True)
        int_in("top_k", -1, INT64_MAX, "must be -1 (disabled), 0 (disabled) or a positive integer")
        number_in("min_p", 0.0, 1.0, "must be in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer")
        number_in("presence_penalty", -2.0, 2.0, "must be in [-2, 2]")
        number_in("frequency_penalty", -2.0, 2.0, "must be in [-2, 2]")
        number_in("repetition_penalty", 0.0, 2.0, "must be in (0, 2]", open_low=True)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                int_in(name, 0, self.MAX_LOGPROBS, f"must be an integer in [0, {self.MAX_LOGPROBS}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if self.output_kind not in self.OUTPUT_KINDS:
            bad("output_kind", f"must be one of {self.OUTPUT_KINDS}")
        if any(not _is_int(t) or not 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.logit_bias is not None:
            limit = self.MAX_LOGIT_BIAS
            if not isinstance(self.logit_bias, dict) or any(
                    not _is_int(t) or not 0 <= t <= INT64_MAX or not _is_number(b) or not -limit <= b <= limit
                    for t, b in self.logit_bias.items()):
                bad("logit_bias", f"must map token ids (integers >= 0) to biases in [-{limit:g}, {limit:g}]")
        if self.max_depth is not None and (not isinstance(self.max_depth, int) or isinstance(self.max_depth, bool)
                                           or self.max_depth < 1):
            bad("max_depth", "must be an integer >= 1")
        if self.router_threshold is not None and (not isinstance(self.router_threshold, (int, float))
                                                  or isinstance(self.router_threshold, bool)
                                                  or not math.isfinite(self.router_threshold)):
            bad("router_threshold", "must be a finite number")
        if not isinstance(self.allow_depth_reduction, bool):
            bad("allow_depth_reduction", "must be a boolean")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            bad("cache_salt", "must be a non-empty string")
