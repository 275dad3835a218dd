"""Per-request recursion depth: the SamplingParams overrides checked against the model, and the
per-position depth caps a sequence's tokens were (or will be) routed with.

- `max_depth` (1..Nr) caps the recursions every token of the request takes: expert choice and
  no-router models stop at the cap, token choice takes the argmax over depths 1..max_depth.
- `router_threshold` (expert choice only) replaces the model's routing threshold.
- `allow_depth_reduction` lets the load-adaptive depth policy (engine/depth_policy.py) lower the
  cap of the request's later tokens while the server is loaded.

A sequence's cap can change while it runs (the policy), so the cap of every position is recorded
(`DepthCaps`, run-length segments): a recomputation after preemption routes each token with the
cap it had the first time, and a prefix-cache block key carries the caps its tokens used.
"""

from __future__ import annotations

import bisect

from morserve.config import MoRConfig
from morserve.engine.sampling_params import ParamError, SamplingParams


def threshold_range(mor: MoRConfig) -> tuple[float, float]:
    """The values the expert router's activation takes (sigmoid: [0, 1], tanh: [-1, 1])."""
    return (0.0, 1.0) if mor.router_func == "sigmoid" else (-1.0, 1.0)


def check_depth_params(params: SamplingParams, mor: MoRConfig) -> None:
    """Raise ParamError (a ValueError naming the field) for overrides this model cannot take."""
    nr = mor.num_recursions
    if params.max_depth is not None and not 1 <= params.max_depth <= nr:
        raise ParamError(f"max_depth must be in [1, {nr}] (the model's num_recursions), "
                         f"got {params.max_depth}", "max_depth")
    if params.router_threshold is not None:
        if mor.router != "expert":
            kind = "token-choice routing" if mor.router == "token" else "no router"
            raise ParamError(f"router_threshold applies to expert-choice routing only; "
                             f"this model has {kind}", "router_threshold")
        lo, hi = threshold_range(mor)
        if not lo <= params.router_threshold <= hi:
            raise ParamError(f"router_threshold must be in [{lo}, {hi}] for a "
                             f"{mor.router_func} router, got {params.router_threshold}", "router_threshold")


def request_max_depth(params: SamplingParams, mor: MoRConfig) -> int:
    return mor.num_recursions if params.max_depth is None else params.max_depth


def request_threshold(params: SamplingParams, mor: MoRConfig) -> float:
    """The expert-choice threshold the request routes with (the model's unless overridden)."""
    return mor.routing_threshold if params.router_threshold is None else float(params.router_threshold)


class DepthCaps:
    """The depth cap of every position of a sequence, as segments (first position, cap): the cap
    of position p is that of the last segment starting at or before p."""

    def __init__(self, cap: int) -> None:
        self.starts = [0]
        self.caps = [cap]

    def at(self, position: int) -> int:
        return self.caps[bisect.bisect_right(self.starts, position) - 1]

    def span(self, start: int, end: int) -> list[int]:
        """Caps of positions [start, end)."""
        out: list[int] = []
        i = bisect.bisect_right(self.starts, start) - 1
        p = start
        while p < end:
            stop = self.starts[i + 1] if i + 1 < len(self.starts) else end
            stop = min(stop, end)
            out += [self.caps[i]] * (stop - p)
            p, i = stop, i + 1
        return out

    @property
    def current(self) -> int:
        """The cap of positions not yet routed."""
        return self.caps[-1]

    def set_from(self, position: int, cap: int) -> None:
        """Positions >= `position` (none of them routed yet) take `cap`."""
        if cap == self.caps[-1]:
            return
        if position <= self.starts[-1]:
            if position < self.starts[-1]:
                raise ValueError(f"position {position} is before the last cap change at {self.starts[-1]}")
            self.caps[-1] = cap
            if len(self.caps) > 1 and self.caps[-2] == cap:
                self.starts.pop()
                self.caps.pop()
            return
        self.starts.append(position)
        self.caps.append(cap)
