"""Turns a batch of logits rows into next tokens, on the logits' device, in a fixed number of
batched operations: penalties, banned tokens (min_tokens), temperature, top-k / min-p / top-p, then
greedy argmax or an inverse-CDF draw with one uniform number from the row's own generator. Every
operation is row-wise, so a seeded request samples the same tokens whatever else shares its batch.

Overflow is tamed rather than propagated: logits pushed to +inf (a tiny repetition penalty, a tiny
temperature) become the largest finite float, NaN becomes -inf. A row left with no finite logit
(every token banned, or a model that produced NaN) is reported as None, and only its sequence fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from morserve.engine.outputs import TokenLogprobs
from morserve.engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What one row of the batch needs besides its logits."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    banned: list[int]                      # never chosen (EOS / stop ids before min_tokens)
    generator: torch.Generator | None      # CPU generator: one uniform per random draw


@dataclass
class Sampled:
    token: int
    logprob: float                         # of the chosen token under the raw model distribution
    top: TokenLogprobs | None              # top-N alternatives + the chosen one, if asked


def _row_index(lists: list[list[int]], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row, token) index pairs for the given token lists."""
    row_idx = np.repeat(np.asarray(rows, dtype=np.int64), [len(x) for x in lists])
    tok_idx = np.fromiter((t for x in lists for t in x), dtype=np.int64)
    return torch.from_numpy(row_idx), torch.from_numpy(tok_idx)


def apply_penalties(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (prompt + output tokens), frequency and presence (output tokens) penalties, in
    place on x [R, V] float32, touching only the rows that ask for them."""
    dev, (r, v) = x.device, x.shape
    rep = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if rep:
        seen = torch.zeros(r, v, dtype=torch.bool)
        idx = _row_index([rows[i].prompt_ids + rows[i].output_ids for i in rep], rep)
        seen[idx] = True
        penalty = torch.tensor([row.params.repetition_penalty for row in rows], device=dev)[:, None]
        seen = seen.to(dev)
        x.copy_(torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x))
    add = [i for i, row in enumerate(rows) if row.output_ids and
           (row.params.frequency_penalty or row.params.presence_penalty)]
    if add:
        counts = torch.zeros(r, v)
        row_idx, tok_idx = _row_index([rows[i].output_ids for i in add], add)
        counts.index_put_((row_idx, tok_idx), torch.ones(len(tok_idx)), accumulate=True)
        counts = counts.to(dev)
        freq = torch.tensor([row.params.frequency_penalty for row in rows], device=dev)[:, None]
        pres = torch.tensor([row.params.presence_penalty for row in rows], device=dev)[:, None]
        x -= freq * counts + pres * (counts > 0).float()
    return x


def _ban(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    with_bans = [i for i, row in enumerate(rows) if row.banned]
    if with_bans:
        row_idx, tok_idx = _row_index([rows[i].banned for i in with_bans], with_bans)
        x[row_idx.to(x.device), tok_idx.to(x.device)] = float("-inf")


def _truncate_sorted(sorted_p: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Zero, in descending-sorted probabilities [R, V], what top-k, min-p and top-p exclude (the
    most likely token always stays). top-p applies to the mass left after top-k and min-p."""
    dev, v = sorted_p.device, sorted_p.shape[1]
    top_k = torch.tensor([row.params.top_k if row.params.top_k > 0 else v for row in rows], device=dev)
    min_p = torch.tensor([row.params.min_p for row in rows], device=dev)
    top_p = torch.tensor([row.params.top_p for row in rows], device=dev)
    keep = torch.arange(v, device=dev)[None, :] < top_k[:, None]
    keep &= sorted_p >= min_p[:, None] * sorted_p[:, :1]
    kept = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    cum = kept.cumsum(-1)
    keep &= (cum - kept) <= top_p[:, None] * cum[:, -1:]
    keep[:, 0] = True
    return torch.where(keep, sorted_p, torch.zeros_like(sorted_p))


def _draw(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Random rows: softmax(x / T), truncation, then the token (in vocabulary order) where the
    row's cumulative probability first exceeds u * total, u ~ U[0, 1) from the row's generator.
    The draw is the same computation for a row whatever the other rows ask for."""
    probs = torch.softmax(x, dim=-1)
    if any(r.params.top_k > 0 or r.params.min_p > 0 or r.params.top_p < 1.0 for r in rows):
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        probs = torch.zeros_like(probs).scatter_(1, order, _truncate_sorted(sorted_p, rows))
    u = torch.cat([torch.rand(1, generator=row.generator) for row in rows]).to(x.device)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    return pick.squeeze(1).clamp_(max=x.shape[1] - 1)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[Sampled | None]:
    """logits [R, V] (raw model output, any float dtype, any device) -> one Sampled per row, or
    None where the row has no token left to choose."""
    dev = logits.device
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    x = apply_penalties(logits.clone(), rows)
    _ban(x, rows)
    temps = torch.tensor([1.0 if r.params.greedy else r.params.temperature for r in rows], device=dev)
    x = (x / temps[:, None]).nan_to_num_(nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                                                      neginf=float("-inf"))
    valid = torch.isfinite(x).any(dim=-1)
    tokens = x.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        sel = torch.tensor(random_rows, device=dev)
        tokens[sel] = _draw(x[sel], [rows[i] for i in random_rows])
    chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
    num_top = max(r.params.logprobs or 0 for r in rows)
    top_values, top_ids = raw_logprobs.topk(num_top, dim=-1) if num_top else (None, None)

    tokens_l, chosen_l, valid_l = tokens.tolist(), chosen.tolist(), valid.tolist()
    if num_top:
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    out: list[Sampled | None] = []
    for i, row in enumerate(rows):
        if not valid_l[i]:
            out.append(None)
            continue
        top = None
        if row.params.logprobs is not None:
            n = row.params.logprobs
            top = dict(zip(top_ids[i][:n], top_values[i][:n])) if n else {}
            top[tokens_l[i]] = chosen_l[i]
        out.append(Sampled(tokens_l[i], chosen_l[i], top))
    return out


def prompt_logprobs(logits: torch.Tensor, targets: list[int], num: list[int]) -> list[TokenLogprobs]:
    """logits [R, V] of prompt positions, the prompt token each predicts, and how many top
    alternatives each row reports -> {token: logprob} per row (top-num plus the target)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(targets, device=logits.device)
    chosen = logprobs.gather(1, target[:, None]).squeeze(1).tolist()
    k = max(num)
    values, ids = logprobs.topk(k, dim=-1) if k else (None, None)
    values, ids = (values.tolist(), ids.tolist()) if k else ([[]] * len(num), [[]] * len(num))
    out = []
    for i, n in enumerate(num):
        entry = dict(zip(ids[i][:n], values[i][:n]))
        entry[targets[i]] = chosen[i]
        out.append(entry)
    return out
