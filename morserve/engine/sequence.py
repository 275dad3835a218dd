"""Per-request state: a Request holds n Sequences (one per sampled completion); a Sequence has
at most one Chunk in flight: a run of its tokens moving through prologue, recursions and
epilogue together (a prompt chunk, or the single freshly sampled token of a decode step)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


from morserve.engine.depth import DepthCaps
from morserve.engine.outputs import TokenLogprobs
from morserve.engine.sampling_params import SamplingParams
from morserve.engine.structured import GrammarState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: "Request"
    index: int                                   # completion index within the request
    token_ids: list[int]                         # prompt + generated
    seed: int                                    # sampling seed in [0, 2**64): see sampler.py
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0                        # tokens whose K/V went through every stage
    depths: list[int] = field(default_factory=list)          # per generated token: depth of the position that produced it
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    chunk: "Chunk | None" = None
    grammar: GrammarState | None = None          # structured outputs: the output's matcher
    caps: DepthCaps | None = None                # depth cap of every position (see depth.py)
    prompt_depths: list[int] = field(default_factory=list)   # recursions taken, per computed prompt position
    embedded: int = 0                            # positions that ever entered the model (caps fixed below it)

    def __post_init__(self) -> None:
        if self.caps is None:
            self.caps = DepthCaps(self.request.max_depth)

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def finished(self) -> bool:
        return self.status == SeqStatus.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    error: str | None = None                     # why it failed, when it failed in the engine
    max_depth: int = 1                           # the request's own depth cap (SamplingParams.max_depth or Nr)
    router_threshold: float = 0.0                # the expert-choice threshold it routes with
    cache_scope: bytes = b""                      # prefix-cache scope: threshold and cache_salt (prefix_cache.py)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass(eq=False)
class Chunk:
    """Tokens [start, start + n) of a sequence, in flight. `slots` are their rows in the hidden
    pool; `active` marks those that take recursion `depth` next; `taken` counts recursions done.
    Per-token state is host-side Python lists: the runner builds each step's metadata from it."""

    seq: Sequence
    start: int
    token_ids: list[int]
    slots: list[int] | None = None             # [n] rows of the hidden-state pool
    depth: int = 1
    active: list[bool] | None = None           # per token
    num_active: int = 0                        # sum(active), kept by the runner
    taken: list[int] | None = None             # per token
    target_depth: list[int] | None = None      # token choice: chosen depth per token
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + self.n

    @property
    def in_block(self) -> bool:
        return self.num_active > 0
