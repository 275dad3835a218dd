"""Steering the routed depth toward a target mean depth D (1 <= D <= Nr).

The routed depth is what the routing rule decides, not the router's soft expectation, so the
target acts on the decisions themselves:
- expert choice trains with top-k, so the capacities fix the routed depth: D sets the geometric
  keep ratio k with 1 + k + ... + k^(Nr-1) = D (capacities 1, k, k^2, ...), and the BCE aux loss
  teaches the inference threshold rule to reproduce those selections;
- token choice routes by argmax(softmax + router_bias): loss-free bias updates move the load of
  each depth toward the maximum-entropy distribution over 1..Nr whose mean is D (p_i ∝ e^(λ i);
  uniform when D = (Nr + 1) / 2, the plain balancing target).
"""

from __future__ import annotations

import math

import torch

from morserve.config import MoRConfig
from morserve.train.metrics import depth_histogram


def _bisect(f, lo: float, hi: float, target: float, iters: int = 100) -> float:
    """x in [lo, hi] with f(x) = target for an increasing f."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def check_target(target: float, num_recursions: int) -> None:
    if not 1.0 <= target <= num_recursions:
        raise ValueError(f"target depth must be in [1, Nr = {num_recursions}], got {target}")


def keep_ratio_for_depth(target: float, num_recursions: int) -> float:
    """k in (0, 1] such that the geometric capacities 1, k, .., k^(Nr-1) sum to `target`."""
    check_target(target, num_recursions)
    if num_recursions == 1:
        return 1.0
    return max(1e-6, _bisect(lambda k: sum(k ** r for r in range(num_recursions)), 0.0, 1.0, target))


def depth_loads(target: float, num_recursions: int) -> list[float]:
    """Maximum-entropy distribution over depths 1..Nr with mean `target`."""
    check_target(target, num_recursions)
    depths = range(1, num_recursions + 1)

    def loads(lam: float) -> list[float]:
        w = [math.exp(lam * (d - num_recursions)) if lam > 0 else math.exp(lam * (d - 1)) for d in depths]
        return [x / sum(w) for x in w]

    lam = _bisect(lambda lam: sum(d * p for d, p in zip(depths, loads(lam))), -60.0, 60.0, target)
    return loads(lam)


def update_router_bias(mor: MoRConfig, depths: torch.Tensor, rate: float, target_loads: list[float]) -> None:
    """Loss-free balancing (token choice): raise the bias of depths used less than their target
    load, lower the others."""
    load = depth_histogram(depths, mor.num_recursions)
    bias = mor.router_bias or [0.0] * mor.num_recursions
    mor.router_bias = [b + rate * math.copysign(1.0, t - f) if f != t else b
                       for b, f, t in zip(bias, load, target_loads)]


def steer_expert_capacity(mor: MoRConfig, target: float) -> None:
    """Set the expert-choice capacity to the keep ratio whose capacities sum to `target`."""
    if mor.capacity is not None:
        raise ValueError(f"a target depth sets the capacities itself; the config already has capacity "
                         f"{mor.capacity!r}: give one or the other")
    mor.capacity = keep_ratio_for_depth(target, mor.num_recursions)
