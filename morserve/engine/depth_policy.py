"""Load-adaptive depth (`--depth-policy adaptive`): under load, lower the depth cap of the requests
that allow it (SamplingParams.allow_depth_reduction) and restore it when the load falls.

The load is one of
- `queue_time`: seconds the oldest waiting sequence has waited,
- `kv_usage`: the KV pool's usage (0..1).
Each tick the policy compares it with its target: above the target the cap drops by one (not
below 1), under half the target it rises by one (up to Nr); at most one change per `cooldown`
ticks, so that a change can take effect before the next. The `fixed` policy never changes it.

A cap change applies to tokens that have not entered the model yet (engine/depth.py records the
cap of every position), so recomputation after preemption and prefix-cache keys see the caps the
tokens were really routed with. Requests that did not opt in are never touched.
"""

from __future__ import annotations

DEPTH_POLICIES = ("fixed", "adaptive")
LOAD_METRICS = ("queue_time", "kv_usage")


class DepthPolicy:
    def __init__(self, kind: str, metric: str, target: float, num_recursions: int, cooldown: int = 8) -> None:
        if kind not in DEPTH_POLICIES:
            raise ValueError(f"depth_policy must be one of {DEPTH_POLICIES}, got {kind!r}")
        if metric not in LOAD_METRICS:
            raise ValueError(f"depth_policy_metric must be one of {LOAD_METRICS}, got {metric!r}")
        if not target > 0:
            raise ValueError(f"depth_policy_target must be > 0, got {target!r}")
        self.kind, self.metric, self.target = kind, metric, target
        self.num_recursions, self.cooldown = num_recursions, cooldown
        self.cap = num_recursions
        self.load = 0.0
        self._since_change = cooldown

    def update(self, queue_time: float, kv_usage: float) -> bool:
        """Feed this tick's load; True when the cap changed."""
        self.load = queue_time if self.metric == "queue_time" else kv_usage
        if self.kind == "fixed":
            return False
        self._since_change += 1
        if self._since_change < self.cooldown:
            return False
        if self.load > self.target and self.cap > 1:
            self.cap -= 1
        elif self.load < self.target / 2 and self.cap < self.num_recursions:
            self.cap += 1
        else:
            return False
        self._since_change = 0
        return True
