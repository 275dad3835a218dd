"""Pure-PyTorch reference of every kernel in this package, with the exact signatures of the Triton
versions. The engine uses these on CPU; tests compare the Triton kernels against them.

Paged KV layout (one pool per model layer): k_cache / v_cache [num_pages, block_size, Hkv, D].
A query row t belongs to group g = query_group[t] whose logical KV sequence is
entry i -> page block_tables[g, i // block_size], offset i % block_size; row t sees entries
0 .. kv_lens[t] - 1 (so intra-chunk causality is expressed per row; a row that sees nothing gets
zeros). Slots in slot_mapping are flat: page * block_size + offset, -1 = do not store.
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


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] to flat slots (page * block_size + offset); slot -1 skips the row."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def store_kv_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (half rotation, cos/sin [T, D]) on q [T, H, D] and k [T, Hkv, D], then store_kv of the
    roped k and v; returns the roped (q, k), new contiguous tensors of q's and k's dtypes."""
    from morserve.model.layers import apply_rope  # deferred: morserve.model may come to import kernels

    q_roped = apply_rope(q, cos, sin).to(q.dtype).contiguous()
    k_roped = apply_rope(k, cos, sin).to(k.dtype).contiguous()
    store_kv(k_roped, v, k_cache, v_cache, slot_mapping)
    return q_roped, k_roped


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_group: torch.Tensor, kv_lens: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]; GQA (head i reads KV head i // (H / Hkv)); softmax in float32.

    Consecutive rows of one group (a prefill chunk; a decode row alone) form a run: the run
    gathers its group's first S entries once (S: the longest kv_len among its rows; slots past a
    row's kv_len are masked, and past the run's S repeat its entry 0, so nothing unwritten is
    read) and one torch scaled_dot_product_attention call serves every run of a slice of rows,
    the run's rows x the query heads of a KV head forming the query length. Rows that see
    nothing get zeros. Slices keep the gathered [rows, S, H, D] float32 work near 64 MB."""
    t, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    per_kv = h // hkv
    lens = kv_lens.long()
    shortest, longest = (int(x) for x in torch.aminmax(lens)) if t else (0, 0)
    if longest == 0:
        return torch.zeros_like(q)
    seen = None if shortest > 0 else torch.nonzero(lens > 0).squeeze(1)        # None: every row
    num_seen = t if seen is None else len(seen)
    flat_k, flat_v = k_cache.view(-1, hkv * d), v_cache.view(-1, hkv * d)
    step = max(1, (1 << 24) // (longest * h * d))
    pieces = []
    for start in range(0, num_seen, step):
        rows = slice(start, start + step) if seen is None else seen[start: start + step]
        row_lens, queries = lens[rows], q[rows].float()
        n = len(row_lens)
        table_rows, run_of, counts = torch.unique_consecutive(query_group[rows], return_inverse=True,
                                                              return_counts=True)
        runs, width = len(table_rows), int(counts.max())
        if width == 1:                       # every row its own run (decode)
            run_lens, mask_lens = row_lens, row_lens[:, None, None, None]        # [R, 1, 1, 1]
            queries = queries.reshape(runs, hkv, per_kv, d)
        else:                                # run r's i-th row at [r, i] of a padded [R, W] layout
            rank = torch.arange(n, device=q.device) - (counts.cumsum(0) - counts)[run_of]
            run_lens = torch.zeros(runs, dtype=torch.long, device=q.device).scatter_reduce_(
                0, run_of, row_lens, "amax")
            padded = q.new_zeros((runs, width, h, d), dtype=torch.float32)
            padded[run_of, rank] = queries
            queries = padded.view(runs, width, hkv, per_kv, d).transpose(1, 2).reshape(runs, hkv, width * per_kv, d)
            padded_lens = torch.zeros(runs, width, dtype=torch.long, device=q.device)
            padded_lens[run_of, rank] = row_lens
            mask_lens = padded_lens[:, None, :, None].expand(runs, 1, width, per_kv).reshape(runs, 1, -1, 1)
        length = int(run_lens.max())
        pos = torch.arange(length, device=q.device)
        slots = block_tables[table_rows][:, pos // bs].long() * bs + pos % bs    # [R, S]
        slots = torch.where(pos < run_lens[:, None], slots, slots[:, :1]).flatten()
        k = flat_k.index_select(0, slots).view(runs, length, hkv, d).transpose(1, 2).float()
        v = flat_v.index_select(0, slots).view(runs, length, hkv, d).transpose(1, 2).float()
        attended = torch.nn.functional.scaled_dot_product_attention(queries, k, v, attn_mask=pos < mask_lens,
                                                                    scale=scale)
        if width > 1:
            attended = attended.view(runs, hkv, width, per_kv, d).transpose(1, 2)[run_of, rank]
        pieces.append(attended.reshape(n, h, d).to(q.dtype))
    attended = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if seen is None:
        return attended
    return torch.zeros_like(q).index_copy_(0, seen, attended)
