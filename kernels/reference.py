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


# --- the decode loop's row state (kernels/loop_state.py) --------------------------------------------
# The multi-step decode loop (morserve/engine/decode_loop.py) keeps one row per sequence: live [R]
# bool, depth [R] int64 (0 = the row's token has not entered the model, 1..Nr = its block depth,
# -d = it left the block at depth d in this tick), slot / position / target [R] int64, lengths
# [R, stages] int64 (K/V entries per cache stage), and per-tick records indexed by the device
# counter step [1]. These ops update that state in place, a tick's bookkeeping in three launches
# (loop_block_meta, loop_block_exit, loop_emit; loop_prologue_rows prepares the first tick).

def _stage0_rows(use: torch.Tensor, slot: torch.Tensor, position: torch.Tensor,
                 scratch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage-0 metadata of a prologue / epilogue over the rows `use` selects: (pool slot int64, the
    scratch row elsewhere; entry written int64 = position, -1 elsewhere; kv_len int64 = position + 1,
    0 elsewhere)."""
    return (torch.where(use, slot, scratch), torch.where(use, position, -1),
            torch.where(use, position + 1, 0))


def cache_stage_fields(depth: torch.Tensor, active: torch.Tensor, position: torch.Tensor, lengths: torch.Tensor,
                       share_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache-stage rule of morserve.engine.stages.CacheStages on device rows: depth [R] (1..Nr
    where active), lengths [R, stages] -> (stage read [R], entry written or -1 [R], kv_len [R],
    writes [R] bool) of a block pass over the active rows. Recursion-wise a row reads and writes
    stage `depth`; share-first (`share_first`) it reads stage 1 and only depth 1 writes, deeper
    rows seeing every entry up to their position. Inactive rows write nothing and see nothing."""
    writes = active & (depth == 1) if share_first else active
    stage = torch.ones_like(depth) if share_first else depth
    entry = torch.where(writes, lengths.gather(1, stage[:, None]).squeeze(1), -1)
    kv_len = torch.where(active, torch.where(writes, entry + 1, position + 1), 0)
    return stage, entry, kv_len, writes


def loop_prologue_rows(live: torch.Tensor, depth: torch.Tensor, slot: torch.Tensor, position: torch.Tensor,
                       scratch: int, slots: torch.Tensor, entries: torch.Tensor, kv_lens: torch.Tensor) -> None:
    """The prologue's rows of a decode-loop tick: the live rows at depth 0 (their token enters the
    model). Writes their stage-0 metadata into slots [R] int64, entries [R] int64 and kv_lens [R]
    int64 (the buffers the next tick reads), inert elsewhere (the scratch pool row, entry -1,
    kv_len 0)."""
    for out, value in zip((slots, entries, kv_lens), _stage0_rows(live & (depth == 0), slot, position, scratch)):
        out.copy_(value)


def loop_block_meta(live: torch.Tensor, depth: torch.Tensor, slot: torch.Tensor, position: torch.Tensor,
                    target: torch.Tensor, lengths: torch.Tensor, entered_target: torch.Tensor,
                    prologue_counts: torch.Tensor, occupancy: torch.Tensor, exits: torch.Tensor, step: torch.Tensor,
                    scratch: int, num_recursions: int, share_first: bool, enter: bool) -> torch.Tensor:
    """Before a block pass of a decode-loop tick, in place, and the pass's packed metadata.

    With `enter` (the tick's first pass, after the prologue) the prologue's rows (live, depth 0)
    enter the block: depth 1, lengths[:, 0] = position + 1, target = entered_target (the depths
    token choice chose; pass `target` itself when the router chooses none), and
    prologue_counts[step] = their number, exits[step] = 0.
    Then the rows in the block (live, depth >= 1) are the pass's: by cache_stage_fields' rule each
    gets its stage, entry and kv_len, lengths[row, stage] += the entry it writes, and
    occupancy[step, d - 1] counts them per depth d (set with `enter`, added to otherwise).
    Returns meta [7, R] int64, rows in morserve.engine.tick's order SLOT, POSITION, GROUP, ENTRY,
    KV_LEN, DEPTH, TARGET: GROUP = row * stages + stage indexes the block tables viewed as
    [R * stages, width, layers]; rows not in the pass are inert (scratch slot, entry -1,
    kv_len 0, depth Nr)."""
    from morserve.engine.tick import DEPTH, ENTRY, GROUP, KV_LEN, NUM_FIELDS, POSITION, SLOT, TARGET  # deferred

    rows, stages = lengths.shape
    if enter:
        fresh = live & (depth == 0)
        depth.copy_(torch.where(fresh, 1, depth))
        lengths[:, 0] = torch.where(fresh, position + 1, lengths[:, 0])
        target.copy_(torch.where(fresh, entered_target, target))
        prologue_counts.index_copy_(0, step, fresh.sum().view(1))
        exits.index_fill_(0, step, 0)
    active = live & (depth >= 1)
    d = depth.clamp(1, num_recursions)
    stage, entry, kv_len, writes = cache_stage_fields(d, active, position, lengths, share_first)
    lengths.scatter_add_(1, stage[:, None], writes.long()[:, None])
    at_depth = (active[:, None] & (d[:, None] == torch.arange(1, num_recursions + 1, device=d.device))).sum(0)
    if enter:
        occupancy.index_copy_(0, step, at_depth[None])
    else:
        occupancy.index_add_(0, step, at_depth[None])
    meta = torch.empty(NUM_FIELDS, rows, dtype=torch.long, device=depth.device)
    meta[SLOT], meta[POSITION] = torch.where(active, slot, scratch), position
    meta[GROUP] = torch.arange(rows, device=depth.device) * stages + stage
    meta[ENTRY], meta[KV_LEN] = entry, kv_len
    meta[DEPTH], meta[TARGET] = torch.where(active, d, num_recursions), target
    return meta


def loop_block_exit(live: torch.Tensor, depth: torch.Tensor, cont: torch.Tensor, slot: torch.Tensor,
                    position: torch.Tensor, exits: torch.Tensor, step: torch.Tensor, num_recursions: int,
                    scratch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """After a block pass, in place: the pass's rows (live, depth >= 1) that continue (cont [R]
    bool) go one depth deeper, the others leave at their depth d (depth = -d, exits[step, d - 1]
    counts them). Returns the epilogue's stage-0 rows as loop_prologue_rows does, over the rows
    that left the block in this tick (depth < 0)."""
    active = live & (depth >= 1)
    d = depth.clamp(1, num_recursions)
    left = active & ~cont
    at_depth = (left[:, None] & (d[:, None] == torch.arange(1, num_recursions + 1, device=d.device))).sum(0)
    exits.index_add_(0, step, at_depth[None])
    depth.copy_(torch.where(active & cont, depth + 1, torch.where(left, -d, depth)))
    return _stage0_rows(depth < 0, slot, position, scratch)


def loop_emit(live: torch.Tensor, depth: torch.Tensor, slot: torch.Tensor, position: torch.Tensor,
              token: torch.Tensor, new: torch.Tensor, logprob: torch.Tensor, valid: torch.Tensor,
              out_tokens: torch.Tensor, out_depths: torch.Tensor, out_logprobs: torch.Tensor, step: torch.Tensor,
              scratch: int, slots: torch.Tensor, entries: torch.Tensor, kv_lens: torch.Tensor) -> None:
    """The end of a decode-loop tick, in place: the rows that left the block (depth -d) record
    their sampled token new [R] (-2 where valid [R] is False: no usable token; -1 for the other
    rows), d and logprob [R] in row `step` of out_tokens / out_depths / out_logprobs [steps, R]
    (0 and the logprob as given for the other rows); the token becomes the row's token in flight
    at the next position, depth 0; step += 1; and the next tick's prologue rows are written as
    loop_prologue_rows does."""
    left = depth < 0
    out_tokens.index_copy_(0, step, torch.where(left, torch.where(valid, new, -2), -1)[None])
    out_depths.index_copy_(0, step, torch.where(left, -depth, 0)[None])
    out_logprobs.index_copy_(0, step, logprob.to(out_logprobs.dtype)[None])
    token.copy_(torch.where(left, new, token))
    position.add_(left.long())
    depth.clamp_(min=0)
    step.add_(1)
    loop_prologue_rows(live, depth, slot, position, scratch, slots, entries, kv_lens)

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
