"""Pure-PyTorch reference of every kernel in this package, with the exact signatures of the Triton
versions. The engine uses these on CPU; tests compare the Triton kernels against them.

Paged KV layout (one pool per model layer): k_cache / v_cache [num_pages, block_size, Hkv, D].
A query row t belongs to group g = query_group[t] whose logical KV sequence is
entry i -> page block_tables[g, i // block_size], offset i % block_size; row t sees entries
0 .. kv_lens[t] - 1 (so intra-chunk causality is expressed per row; a row that sees nothing gets
zeros). The K/V store writes row t at entry entries[t] of its group (-1 = do not store).
"""

from __future__ import annotations

import torch


def gather_rows(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """pool [N, d], index [T] (int32/int64) -> pool[index] as a new contiguous [T, d]."""
    return pool.index_select(0, index.long())


def scatter_rows(pool: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """pool[index] = rows, in place (indices are distinct)."""
    pool.index_copy_(0, index.long(), rows.to(pool.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rmsnorm(x) over the last dimension: the mean of squares in float32, the normalised
    row rounded to x's dtype before the weight multiplies it (Llama's order); the result has the
    promoted dtype of weight and x."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with the RMSNorm that follows: new_residual = residual + x (x's shape
    and dtype), returns (rms_norm(new_residual, weight, eps), new_residual)."""
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual


def gather_rows_rmsnorm(pool: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather fused with the RMSNorm that follows: returns (rows, rmsnorm(rows) * weight)."""
    rows = gather_rows(pool, index)
    return rows, rms_norm(rows, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: gate_up [..., 2F] (gate columns first) -> silu(gate) * up [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def lm_head_tail(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The greedy tail of a decode tick over logits [B, V] (any float dtype), with the sampler's
    overflow taming (NaN -> -inf, +inf -> the largest float32): returns (argmax int64 [B], the
    first index of the row's maximum; log-probability float32 [B] of that token under the row's
    log-softmax; finite bool [B], whether the row has any finite logit, i.e. a usable token)."""
    x = logits.float().nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                                  neginf=float("-inf"))
    token = x.argmax(dim=-1)
    logprob = torch.log_softmax(x, dim=-1).gather(1, token[:, None]).squeeze(1)
    return token, logprob, torch.isfinite(x).any(dim=-1)


def _slots(block_tables: torch.Tensor, query_group: torch.Tensor, entries: torch.Tensor,
           page_size: int) -> torch.Tensor:
    """Flat slots (page * page_size + offset) of entry entries[t] of table row query_group[t]."""
    entries = entries.long()
    pages = block_tables[query_group.long(), entries // page_size].long()
    return pages * page_size + entries % page_size


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             block_tables: torch.Tensor, query_group: torch.Tensor, entries: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] at entry entries[t] of table row query_group[t] (block_tables
    [groups, pages], any strides); entry -1 skips the row."""
    keep = entries >= 0
    slots = _slots(block_tables, query_group[keep], entries[keep], k_cache.shape[1])
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def store_kv_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, query_group: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """RoPE (half rotation; cos/sin: start-up tables [P, D], row positions[t]) on q [T, H, D] and
    k [T, Hkv, D], then store_kv of the roped k and v; returns the roped q (new, contiguous, q's dtype)."""
    from morserve.model.layers import apply_rope  # deferred: morserve.model may come to import kernels

    positions = positions.long()
    cos, sin = cos.index_select(0, positions), sin.index_select(0, positions)
    k_roped = apply_rope(k, cos, sin).to(k.dtype)
    store_kv(k_roped, v, k_cache, v_cache, block_tables, query_group, entries)
    return apply_rope(q, cos, sin).to(q.dtype).contiguous()


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_group: torch.Tensor, kv_lens: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]; GQA (head i reads KV head i // (H / Hkv)); softmax in float32.
    Rows are processed in slices whose gathered [rows, S, H, D] float32 work stays near 64 MB."""
    t, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    lens = kv_lens.long()
    s = int(lens.max()) if t else 0
    if s == 0:
        return out
    nb = -(-s // bs)
    visible_pos = torch.arange(s, device=q.device)
    step = max(1, (1 << 24) // (s * h * d))
    for start in range(0, t, step):
        rows = slice(start, min(t, start + step))
        pages = block_tables[query_group[rows].long(), :nb].long()              # [R, nb]
        r = pages.shape[0]
        k = k_cache[pages].reshape(r, nb * bs, hkv, d)[:, :s].float()          # [R, S, Hkv, D]
        v = v_cache[pages].reshape(r, nb * bs, hkv, d)[:, :s].float()
        qg = q[rows].float().view(r, hkv, h // hkv, d)
        scores = torch.einsum("rkgd,rskd->rkgs", qg, k) * scale
        visible = visible_pos[None, :] < lens[rows, None]                        # [R, S]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, -1).masked_fill((lens[rows] == 0)[:, None, None, None], 0.0)
        v = v.masked_fill(~visible[:, :, None, None], 0.0)                       # unread slots may hold NaN
        out[rows] = torch.einsum("rkgs,rskd->rkgd", probs, v).reshape(r, h, d).to(q.dtype)
    return out


# --- phase ends: the residual stream into the hidden-state pool, and the routers' row updates ---------
# `pool` [N, d] holds one row per token in flight, `index` [T] the batch's pool rows; per-token
# routing state lives in pool-indexed vectors too (score float32, cap int64, threshold float32).

def _stream(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return x if residual is None else residual + x


def _activation(raw: torch.Tensor, router_func: str) -> torch.Tensor:
    if router_func == "sigmoid":
        return torch.sigmoid(raw)
    if router_func == "tanh":
        return torch.tanh(raw)
    raise ValueError(f"no router_func {router_func!r}")


def scatter_stream(pool: torch.Tensor, index: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                   copy: torch.Tensor | None, temp: float | None) -> torch.Tensor | None:
    """The stream s = residual + x (x when residual is None) of a layer stack's rows into pool rows
    `index` (and into `copy` rows when given); returns s / temp (a router's input) when temp is given."""
    stream = _stream(x, residual)
    pool.index_copy_(0, index.long(), stream)
    if copy is not None:
        copy.index_copy_(0, index.long(), stream)
    return None if temp is None else stream / temp


def update_plain(pool: torch.Tensor, index: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                 depth: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """No router: the block's output stream replaces the pool rows; returns continue [T] bool =
    depth < cap[index] (every token takes every recursion up to its cap)."""
    pool.index_copy_(0, index.long(), _stream(x, residual))
    return depth < cap.index_select(0, index.long())


def update_token(pool: torch.Tensor, index: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                 entry: torch.Tensor, score: torch.Tensor, depth: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Token choice: a token at its final recursion (target == depth) gets entry + score * stream,
    the others the stream; returns continue [T] bool = target > depth."""
    index = index.long()
    stream = _stream(x, residual)
    gated = entry.index_select(0, index) + score.index_select(0, index)[:, None].to(stream.dtype) * stream
    pool.index_copy_(0, index, torch.where((target == depth)[:, None], gated, stream))
    return target > depth


def update_expert(pool: torch.Tensor, index: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                  score: torch.Tensor, alpha: float, router_func: str, temp: float) -> torch.Tensor:
    """Expert choice: pool rows h become h + alpha * act(score[index]) * stream (the gate of the
    recursion just taken); returns the new rows / temp, the routers' input."""
    index = index.long()
    gate = alpha * _activation(score.index_select(0, index), router_func)
    new = pool.index_select(0, index) + gate[:, None].to(pool.dtype) * _stream(x, residual)
    pool.index_copy_(0, index, new)
    return new / temp


def expert_decide(raw: torch.Tensor, depth: torch.Tensor, index: torch.Tensor, score: torch.Tensor,
                  cap: torch.Tensor, threshold: torch.Tensor, bias: torch.Tensor, router_func: str) -> torch.Tensor:
    """raw [T, Nr]: every expert router's score (column r-1 = router r) after the recursion `depth`
    [T] just taken. The score of the token's next router r = min(depth + 1, Nr) goes to
    score[index] (float32); returns continue [T] bool = depth < cap[index] and
    act(score + bias[r-1]) >= threshold[index]."""
    index = index.long()
    following = depth.clamp(max=raw.shape[1] - 1)[:, None]
    nxt = raw.gather(1, following).squeeze(1).float()
    score.index_copy_(0, index, nxt)
    takes = _activation(nxt + bias[following.squeeze(1)], router_func) >= threshold.index_select(0, index)
    return (depth < cap.index_select(0, index)) & takes


def token_decide(logits: torch.Tensor, index: torch.Tensor, score: torch.Tensor, cap: torch.Tensor,
                 bias: torch.Tensor, alpha: float) -> torch.Tensor:
    """Token choice at entry: logits [T, Nr] -> depth [T] int64 = 1 + argmax over depths
    1..cap[index] of softmax(logits) + bias; score[index] = alpha * softmax(logits)[depth - 1]."""
    index = index.long()
    probs = torch.softmax(logits.float(), dim=-1)
    depths = torch.arange(1, logits.shape[-1] + 1, device=logits.device)
    scores = (probs + bias).masked_fill(depths > cap.index_select(0, index)[:, None], float("-inf"))
    choice = scores.argmax(dim=-1)
    score.index_copy_(0, index, alpha * probs.gather(1, choice[:, None]).squeeze(1))
    return choice + 1
