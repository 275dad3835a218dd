"""Schedules: learning rate (linear warm-up, cosine decay) and expert-choice capacity warm-up
(cosine from 1.0 down to each recursion's target over `cap_warmup_steps`, as in the reference
MoR training code)."""

from __future__ import annotations

import math


def learning_rate(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Step is 0-based. Linear warm-up to max_lr over warmup_steps, then cosine to min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def capacity_at(step: int, targets: list[float], warmup_steps: int) -> list[float]:
    """Capacity of each recursion at (1-based) training `step`: target + (1 - target) * decay,
    decay = (1 + cos(pi * min(1, step / warmup_steps))) / 2; no warm-up: the targets."""
    if warmup_steps <= 0:
        return list(targets)
    decay = 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / warmup_steps)))
    return [c + (1.0 - c) * decay for c in targets]
