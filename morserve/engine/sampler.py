"""Turns a batch of logits rows into next tokens, on the logits' device, in a fixed number of
batched operations: penalties, banned tokens (min_tokens), temperature, top-k / min-p / top-p, then
greedy argmax or an inverse-CDF draw. The draw's uniform number is a hash of the sequence's seed
and the position of the token being drawn (counter-based, no generator state), so a seeded request
samples the same tokens whatever else shares its batch, after a preemption, and whether the engine
or the device decode loop (decode_loop.py, which calls the same functions) drew them.

Overflow is tamed rather than propagated: logits pushed to +inf (a tiny repetition penalty, a tiny
temperature) become the largest finite float, NaN becomes -inf. A row left with no finite logit
(every token banned, or a model that produced NaN) is reported as None, and only its sequence fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import kernels
from morserve.engine.outputs import TokenLogprobs
from morserve.engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What one row of the batch needs besides its logits."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    banned: list[int]                      # never chosen (EOS / stop ids before min_tokens)
    seed: int                              # the sequence's sampling seed, in [0, 2**64)
    position: int                          # index of the token being drawn in the sequence


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


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) of int64 values in [0, 2**32), exact on every device
    (products wrap in int64 and are masked back to 32 bits)."""
    mask = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """U[0, 1) float32 per row from int64 seeds (two's complement of [0, 2**64)) and positions:
    24 bits of a hash of (seed, position), so the host and the device get the same numbers."""
    mask = 0xFFFFFFFF
    h = _hash32(positions & mask)
    h = _hash32(((seeds >> 32) & mask) ^ h)
    h = _hash32((seeds & mask) ^ h)
    return (h >> 8).to(torch.float32) / float(1 << 24)


def as_int64(seed: int) -> int:
    """A seed in [0, 2**64) as the int64 with the same bits."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def scale_logits(x: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """x / T per row (T = 0, greedy, divides by 1), overflow tamed: NaN -> -inf, +inf -> max."""
    t = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures))
    return (x / t[:, None]).nan_to_num_(nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                                        neginf=float("-inf"))


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: per row, the first token (vocabulary order) whose cumulative probability
    exceeds u * total."""
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    return pick.squeeze(1).clamp_(max=probs.shape[1] - 1)


def _draw(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Random rows (x already scaled): softmax, truncation, then the counter-based draw. The same
    computation for a row whatever the other rows ask for."""
    probs = torch.softmax(x, dim=-1)
    if any(r.params.top_k > 0 or r.params.min_p > 0 or r.params.top_p < 1.0 for r in rows):
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        probs = torch.zeros_like(probs).scatter_(1, order, _truncate_sorted(sorted_p, rows))
    seeds = torch.tensor([as_int64(r.seed) for r in rows], device=x.device)
    positions = torch.tensor([r.position for r in rows], device=x.device)
    return draw(probs, counter_uniform(seeds, positions))


def is_plain(params: SamplingParams, banned: list[int]) -> bool:
    """Greedy or plain temperature sampling: no penalties, bans, truncation or top-N logprobs, so
    `plain_tail` computes the row's token exactly as `sample` does."""
    return (not banned and params.top_k <= 0 and params.top_p >= 1.0 and params.min_p <= 0
            and params.logprobs in (None, 0) and params.repetition_penalty == 1.0
            and not params.presence_penalty and not params.frequency_penalty)


def plain_tail(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
               sampling: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampler for plain rows (`is_plain`) as fixed-shape device work, with no host sync:
    logits [B, V] -> (token int64 [B], its log-probability float32 [B], whether the row has a
    finite logit [B]). Greedy rows take the fused argmax tail (kernels.lm_head_tail); with
    `sampling`, rows of temperature > 0 draw by the counter-based inverse CDF of `sample`."""
    token, logprob, valid = kernels.lm_head_tail(logits)
    if sampling:
        x = logits.float()
        drawn = draw(torch.softmax(scale_logits(x, temperatures), dim=-1), counter_uniform(seeds, positions))
        drawn_logprob = torch.log_softmax(x, dim=-1).gather(1, drawn[:, None]).squeeze(1)
        hot = temperatures > 0
        token, logprob = torch.where(hot, drawn, token), torch.where(hot, drawn_logprob, logprob)
    return token, logprob, valid


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[Sampled | None]:
    """logits [R, V] (raw model output, any float dtype, any device) -> one Sampled per row, or
    None where the row has no token left to choose."""
    dev = logits.device
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    x = apply_penalties(logits.clone(), rows)
    _ban(x, rows)
    x = scale_logits(x, torch.tensor([r.params.temperature for r in rows], device=dev))
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
