"""The batched sampler against straightforward per-row references: penalties, truncation
distributions, row independence, logprobs, rows that overflow or have nothing to sample, and the
counter-based uniform numbers against a plain-Python hash."""

from __future__ import annotations

import math
import random

import pytest
import torch

from morserve.engine.sampler import SamplingRow, apply_penalties, as_int64, counter_uniform, prompt_logprobs, sample
from morserve.engine.sampling_params import SamplingParams

V = 50


def _row(seed: int = 0, prompt=(), output=(), banned=(), position: int = 5, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), list(banned), seed, position)


def _reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Per-row truncated distribution, written the plain way (top-k by rank, min-p relative to the
    max, then top-p on the renormalised remainder; the top token always stays)."""
    probs = torch.softmax(logits.double() / p.temperature, -1)
    order = probs.argsort(descending=True, stable=True)
    keep = torch.zeros(V, dtype=torch.bool)
    mass, kept_total = 0.0, 0.0
    allowed = [int(t) for t in order]
    if p.top_k > 0:
        allowed = allowed[: p.top_k]
    allowed = [t for t in allowed if probs[t] >= p.min_p * probs[order[0]]]
    kept_total = float(sum(probs[t] for t in allowed))
    for t in allowed:
        if mass <= p.top_p * kept_total or not keep.any():
            keep[t] = True
        mass += float(probs[t])
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


def test_greedy_penalties_match_plain_formulas():
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    logits = torch.randn(3, V, generator=gen) * 3
    prompt, output = [1, 2, 3, 3], [4, 4, 4, 5, 2]
    rows = [_row(prompt=prompt, output=output, temperature=0.0, repetition_penalty=1.7),
            _row(prompt=prompt, output=output, temperature=0.0, frequency_penalty=0.9, presence_penalty=-0.4),
            _row(prompt=prompt, output=output, temperature=0.0)]
    got = apply_penalties(logits.clone(), rows)
    want = logits.clone()
    for t in set(prompt) | set(output):
        want[0, t] = want[0, t] / 1.7 if want[0, t] > 0 else want[0, t] * 1.7
    for t in set(output):
        want[1, t] -= 0.9 * output.count(t) - 0.4
    torch.testing.assert_close(got, want)
    tokens = [s.token for s in sample(logits, rows)]
    assert tokens == [int(want[i].argmax()) for i in range(3)]


@pytest.mark.parametrize("params", [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.6),
                                    dict(temperature=1.0, min_p=0.2), dict(temperature=0.9, top_k=8, top_p=0.8),
                                    dict(temperature=1.0)])
def test_draws_follow_the_truncated_distribution(params):
    seed = random.randrange(1 << 30)
    logits = torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 2
    want = _reference_probs(logits, SamplingParams(**params))
    n = 4000
    rows = [_row(seed + i, **params) for i in range(n)]
    counts = torch.bincount(torch.tensor([s.token for s in sample(logits.expand(n, V), rows)]), minlength=V)
    assert (counts[want == 0] == 0).all(), f"seed {seed}: drew an excluded token"
    freq = counts.double() / n
    tol = 5 * torch.sqrt(want * (1 - want) / n) + 1e-3        # 5 sigma per token: ~1e-4 false alarms per run
    assert ((freq - want).abs() <= tol).all(), f"seed {seed}: {freq} vs {want}"


def test_rows_are_independent_of_their_batch():
    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, V, generator=gen)
    kinds = [dict(temperature=0.8), dict(temperature=0.0), dict(temperature=1.2, top_p=0.7, logprobs=3),
             dict(temperature=1.0, top_k=4, repetition_penalty=1.3)]
    batch = [_row(seed + i, prompt=[i % V], output=[(2 * i) % V], **kinds[i % 4]) for i in range(12)]
    together = sample(logits, batch)
    for i in range(12):
        alone = sample(logits[i:i + 1], [_row(seed + i, prompt=[i % V], output=[(2 * i) % V], **kinds[i % 4])])[0]
        assert alone == together[i], f"seed {seed}, row {i}"


def test_logprobs_are_those_of_the_raw_distribution():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    rows = [_row(temperature=0.0, logprobs=4, repetition_penalty=2.0, prompt=list(range(V))),
            _row(temperature=0.0, logprobs=0)]
    out = sample(logits, rows)
    raw = torch.log_softmax(logits, -1)
    for i, s in enumerate(out):
        assert math.isclose(s.logprob, float(raw[i, s.token]), rel_tol=1e-6)
        top = raw[i].topk(rows[i].params.logprobs)
        assert s.top == {**dict(zip(top.indices.tolist(), top.values.tolist())), s.token: s.logprob}


def test_overflow_and_empty_rows_fail_alone():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(5)) * 5
    logits[2] = float("nan")
    rows = [_row(1, prompt=list(range(V)), temperature=1.0, repetition_penalty=1e-38),
            _row(temperature=1e-4, top_p=0.5, seed=2),
            _row(temperature=0.0),
            _row(temperature=0.0, banned=range(V))]
    out = sample(logits, rows)
    assert out[2] is None and out[3] is None
    # a 1e-38 repetition penalty sends every positive logit to +inf: still a valid draw among them
    assert out[0] is not None and logits[0, out[0].token] > 0
    assert out[1] is not None and out[1].token == int(logits[1].argmax())


def test_prompt_logprobs_report_target_and_top():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(9))
    entries = prompt_logprobs(logits, [7, 8, 9], [0, 2, 5])
    raw = torch.log_softmax(logits, -1)
    for i, (entry, target, num) in enumerate(zip(entries, [7, 8, 9], [0, 2, 5])):
        top = raw[i].topk(num)
        want = {**dict(zip(top.indices.tolist(), top.values.tolist())), target: float(raw[i, target])}
        assert entry.keys() == want.keys()
        assert all(math.isclose(entry[k], want[k], rel_tol=1e-6) for k in want)


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_counter_uniform_is_the_plain_hash_and_uniform():
    rng = random.Random()
    seeds = [rng.randrange(1 << 64) for _ in range(64)] + [0, (1 << 64) - 1, 1 << 63]
    positions = [rng.randrange(1 << 20) for _ in seeds]
    got = counter_uniform(torch.tensor([as_int64(s) for s in seeds]), torch.tensor(positions))
    for u, seed, pos in zip(got.tolist(), seeds, positions):
        h = _lowbias32(_lowbias32(seed >> 32 ^ _lowbias32(pos)) ^ (seed & 0xFFFFFFFF))
        assert u == (h >> 8) / float(1 << 24)
    many = counter_uniform(torch.full((20000,), as_int64(rng.randrange(1 << 64))), torch.arange(20000))
    assert 0 <= float(many.min()) and float(many.max()) < 1
    counts = torch.histc(many, bins=10, min=0, max=1)
    assert ((counts - 2000).abs() < 200).all(), counts           # ~4.7 sigma per bin
