"""Steering the routed depth toward a target mean depth D (1 <= D <= Nr).

The routed depth is what the routing rule decides, not the router's soft expectation, so the
target acts on the decisions themselves:
- expert choice trains with top-k, so the capacities fix the routed depth: D sets the geometric
  keep ratio k with 1 + k + ... + k^(Nr-1) = D (capacities 1, k, k^2, ...), and the BCE aux loss
  teaches the inference threshold rule to reproduce those selections; top-k keeps whole tokens
  (int(c * T) of T), which on short sequences lands below D, so at the end `expert_bias`
  calibrates each recursion's router_bias (recursion by recursion) so that the threshold rule
  takes exactly the fractions 1, k, k^2, ... of a calibration sample;
- token choice routes by argmax(softmax + router_bias): loss-free bias updates move the load of
  each depth toward the maximum-entropy distribution over 1..Nr whose mean is D (p_i ∝ e^(λ i);
  uniform when D = (Nr + 1) / 2, the plain balancing target) while training, and at the end
  `fit_token_bias` sets the bias so that the router's decisions on a calibration sample hit
  those loads (the bias moves decisions only, never the gates, so this changes no weights).
"""

from __future__ import annotations

import math

import torch

from morserve.config import MoRConfig
from morserve.model.routing import router_activation
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


def fit_token_bias(probs: torch.Tensor, target_loads: list[float], bias: list[float] | None,
                   iters: int = 400) -> list[float]:
    """A router_bias for which argmax(probs + bias) over probs [N, Nr] (token-choice router
    softmax on a calibration sample) gives each depth its target load (proportional updates with
    a decaying step, starting from `bias`)."""
    nr = probs.shape[-1]
    target = torch.tensor(target_loads, dtype=torch.float32)
    b = torch.tensor(bias or [0.0] * nr, dtype=torch.float32)
    probs = probs.float().reshape(-1, nr)
    best, best_err = b.clone(), float("inf")
    for i in range(iters):
        load = torch.bincount((probs + b).argmax(-1), minlength=nr).float() / len(probs)
        err = float((load - target).abs().sum())
        if err < best_err:
            best, best_err = b.clone(), err
        b += 0.5 * (0.99 ** i) * (target - load) * probs.std().clamp(min=1e-3)
    return best.tolist()


def _raw_threshold(mor: MoRConfig) -> float:
    """The raw score at which act(raw) reaches the routing threshold (act is increasing)."""
    t = mor.routing_threshold
    return _bisect(lambda x: float(router_activation(torch.tensor(x), mor.router_func)), -60.0, 60.0, t)


def expert_bias(raw: torch.Tensor, eligible: torch.Tensor, fraction: float, mor: MoRConfig) -> float:
    """router_bias for one expert recursion: with it, the threshold rule takes round(fraction * N)
    of the N tokens (the highest raw scores among the eligible ones; all of them if fewer). The
    cut sits halfway between the last score taken and the first one left."""
    scores = raw[eligible].float().flatten().sort(descending=True).values
    if len(scores) == 0:
        return 0.0
    m = min(len(scores), round(fraction * raw.numel()))
    lowest_in = float(scores[m - 1]) if m > 0 else float(scores[0]) + 2.0
    highest_out = float(scores[m]) if m < len(scores) else lowest_in - 2.0
    return _raw_threshold(mor) - (lowest_in + highest_out) / 2
