"""What the engine returns: vLLM-shaped RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field

# One position's log-probabilities: {token_id: logprob} holding the top-N tokens and the chosen one.
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)       # depth of the position that produced each generated token
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None           # one dict per generated token
    finish_reason: str | None = None                     # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None                 # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first entry None (no context)
    finished: bool = False
    num_preemptions: int = 0
    error: str | None = None            # set when the request failed in the engine (it is finished)
    arrival_time: float | None = None           # time.monotonic() when it reached the engine
    first_scheduled_time: float | None = None   # ... when it was first scheduled (None: still waiting)
