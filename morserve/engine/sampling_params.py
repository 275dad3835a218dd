"""Per-request sampling parameters (vLLM field names) with validation that names the bad value."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class ParamError(ValueError):
    """A bad request parameter; `param` names the field (the API's 400 reports it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """temperature 0 means greedy; top_k <= 0 and top_p = 1 and min_p = 0 mean no truncation.
    seed makes the request's sampling reproducible whatever else is in the batch. logprobs /
    prompt_logprobs: how many top alternatives to report per token (0 = only the chosen token).
    output_kind: `cumulative` (a RequestOutput after every tick that touched the request, for
    streaming) or `final_only` (only the finished one; what offline generation needs).
    Depth (morserve's extensions, see engine/depth.py): `max_depth` caps the recursions any token
    of the request takes (1..Nr); `router_threshold` replaces the expert-choice routing threshold;
    `allow_depth_reduction` lets a load-adaptive depth policy lower the cap while the server is
    loaded. The model-dependent ranges are checked by the engine (`check_depth_params`)."""

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
    output_kind: str = "cumulative"
    max_depth: int | None = None
    router_threshold: float | None = None
    allow_depth_reduction: bool = False

    OUTPUT_KINDS = ("cumulative", "final_only")

    MAX_LOGPROBS = 20

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
            raise ParamError(name, f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be -1 (disabled), 0 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", "must be in (0, 2]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= self.MAX_LOGPROBS):
                bad(name, f"must be an integer in [0, {self.MAX_LOGPROBS}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if self.output_kind not in self.OUTPUT_KINDS:
            bad("output_kind", f"must be one of {self.OUTPUT_KINDS}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if self.max_depth is not None and (not isinstance(self.max_depth, int) or isinstance(self.max_depth, bool)
                                           or self.max_depth < 1):
            bad("max_depth", "must be an integer >= 1")
        if self.router_threshold is not None and (not isinstance(self.router_threshold, (int, float))
                                                  or isinstance(self.router_threshold, bool)
                                                  or not math.isfinite(self.router_threshold)):
            bad("router_threshold", "must be a finite number")
        if not isinstance(self.allow_depth_reduction, bool):
            bad("allow_depth_reduction", "must be a boolean")
