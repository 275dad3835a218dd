"""The synchronous engine: requests in, one tick per `step()`, RequestOutputs out.

One tick (depth-wise mode):
1. schedule: running sequences without work and admitted waiting ones get their next chunk
   (prompt chunk or freshly sampled token) under the token budget; pages short -> preemption;
2. prologue over the new chunks; they enter recursion 1;
3. ONE block step over every active token of every chunk in flight, at mixed depths; the
   routers decide who continues;
4. chunks with no token left in the block run the epilogue and LM head; their sequences sample
   (or record prompt logprobs) and are ready for their next chunk in the next tick.
Vanilla (depth-synchronous) mode runs step 3 repeatedly inside the tick until every chunk has
left the block, so each decode step does recursions 1..Nr in order over a shrinking batch.

With num_scheduler_steps = K > 1, when every running sequence decodes greedily or by plain
temperature sampling, step() instead hands K ticks of the same semantics to the device decode loop
(decode_loop.py) and takes their tokens back at once; loops are chained while nothing stands in the
way, so the host handles one loop's tokens while the device runs the next.

The depth reported for a generated token is the number of recursions taken by the position that
produced it (the last input token); the dense reference's `depths[prompt_len - 1 + i]`.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from morserve.config import ModelConfig
from morserve.engine.args import EngineArgs
from morserve.engine.cuda_graphs import graph_sizes
from morserve.engine.depth_policy import DepthPolicy
from morserve.engine.depth import check_depth_params, request_max_depth, request_threshold
from morserve.engine.decode_loop import DecodeLoop, LoopHandle, LoopOutput
from morserve.engine.kv_cache import BlockManager
from morserve.engine.outputs import CompletionOutput, RequestOutput
from morserve.engine.runner import ModelRunner
from morserve.engine.sampler import Sampled, SamplingRow, prompt_logprobs, sample
from morserve.engine.sampling_params import SamplingParams
from morserve.engine.scheduler import Scheduler
from morserve.engine.sequence import Chunk, Request, Sequence, SeqStatus
from morserve.model.mor import MoRModel

logger = logging.getLogger(__name__)


@dataclass
class TickStats:
    """What one tick did, for metrics and tests (index d-1 of the lists = depth d)."""

    num_block_tokens: int = 0
    num_prologue_tokens: int = 0
    num_epilogue_tokens: int = 0
    depth_occupancy: list[int] = field(default_factory=list)
    exits_per_depth: list[int] = field(default_factory=list)
    kv_blocks_used: dict[int, int] = field(default_factory=dict)
    kv_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0
    num_generated_tokens: int = 0
    num_block_steps: int = 0
    prefix_cache_queries: int = 0        # cumulative prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0           # cumulative of those found cached (vLLM's names)
    depth_cap: int = 0                   # the depth policy's cap for requests that allow reduction

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass
class LoopFlight:
    """A decode loop launched on the device and not yet collected, over these sequences."""

    seqs: list[Sequence]
    steps: int
    handle: LoopHandle


class LLMEngine:
    def __init__(self, model: MoRModel, tokenizer, args: EngineArgs) -> None:
        args.validate()
        self.args = args
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_config: ModelConfig = model.config
        cfg = self.model_config
        self.max_model_len = min(args.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        mor = cfg.mor
        stages = [cfg.num_prologue_layers + cfg.num_epilogue_layers]
        stages += [cfg.num_block_layers] * (1 if mor.kv_mode == "share_first" else mor.num_recursions)
        param = next(model.parameters())
        page_bytes = 2 * args.block_size * cfg.num_key_value_heads * cfg.head_dim * param.element_size()
        self._worst_pages = lambda n: sum(-(-n // args.block_size) * layers for layers in stages)
        num_pages = args.num_pages(page_bytes, self._worst_pages(self.max_model_len), param.device)
        self.blocks = BlockManager(num_pages, args.block_size, stages, args.enable_prefix_caching)
        self.runner = ModelRunner(self.model, self.blocks, args.max_num_batched_tokens)
        max_graph = min(args.cuda_graph_max_tokens, args.max_num_batched_tokens)
        cuda_graphs = self.runner.device.type == "cuda" and not args.enforce_eager
        if cuda_graphs and max_graph > 0:
            self.runner.use_graphs(graph_sizes(max_graph), self.max_model_len, capture=True)
        self.decode_loop = None
        self._flight: LoopFlight | None = None
        if args.num_scheduler_steps > 1:
            self.decode_loop = DecodeLoop(self.runner, args.max_num_seqs, self.max_model_len,
                                          args.num_scheduler_steps, args.batching == "vanilla", cuda_graphs)
        self.scheduler = Scheduler(self.blocks, args.max_num_seqs, args.max_num_batched_tokens,
                                   self.runner.release_slots)
        self.depth_policy = DepthPolicy(args.depth_policy, args.depth_policy_metric, args.depth_policy_target,
                                        mor.num_recursions)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._rng = torch.Generator().manual_seed(args.seed)
        self.eos_ids = set(tokenizer.eos_token_ids if tokenizer is not None else cfg.eos_token_ids)
        self.tick_listeners: list[Callable[[TickStats], None]] = []
        self.last_tick = TickStats()
        self.total_depth_token_ticks = [0] * mor.num_recursions

    @classmethod
    def from_args(cls, args: EngineArgs) -> "LLMEngine":
        args.validate()
        device = args.resolve_device()
        dtype = args.resolve_dtype(device)
        if isinstance(args.model, MoRModel):
            return cls(args.model.to(device=device, dtype=dtype), args.tokenizer, args)
        from morserve.checkpoint import load_pretrained
        pretrained = load_pretrained(args.model, device=device, dtype=dtype)
        return cls(pretrained.model, pretrained.tokenizer, args)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> Request:
        """Validate and queue a request; raises ValueError naming the problem."""
        params = params or SamplingParams()
        params.validate()
        mor = self.model_config.mor
        check_depth_params(params, mor)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self._prompt_ids(prompt)
        limit = self.max_model_len
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {limit} tokens "
                             f"(max_model_len), leaving no room for output")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - len(ids)
        if len(ids) + max_tokens > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = "
                             f"{len(ids) + max_tokens} exceeds the model's context of {limit} tokens")
        worst = self._worst_pages(len(ids) + max_tokens)
        if worst > self.blocks.num_pages:
            raise ValueError(f"prompt + max_tokens = {len(ids) + max_tokens} tokens may need {worst} "
                             f"KV pages, more than the whole cache ({self.blocks.num_pages})")
        if params.min_tokens and len(self._banned_ids(params)) >= self.model_config.vocab_size:
            raise ValueError(f"min_tokens={params.min_tokens} would ban every token: EOS and stop_token_ids "
                             f"cover the whole vocabulary ({self.model_config.vocab_size} tokens)")
        if params.max_tokens is None:
            params = SamplingParams(**{**params.__dict__, "max_tokens": max_tokens})
        req = Request(request_id, text, ids, params, max_depth=request_max_depth(params, mor),
                      router_threshold=request_threshold(params, mor))
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), req, i, list(ids), self._seed(params, i))
            if params.allow_depth_reduction:
                seq.caps.set_from(0, min(req.max_depth, self.depth_policy.cap))
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return req

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        vocab = self.model_config.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass the prompt as token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            text = prompt
        else:
            ids, text = list(prompt), None
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        if not ids:
            raise ValueError("prompt is empty")
        return text, ids

    def _seed(self, params: SamplingParams, index: int) -> int:
        """Completion `index`'s sampling seed: from the request's seed (any integer, reduced mod
        2**64) or, unseeded, drawn from the engine's own generator."""
        if params.seed is not None:
            return (params.seed * 1_000_003 + index) % 2**64
        return int(torch.randint(0, 2**62, (1,), generator=self._rng))

    def _banned_ids(self, params: SamplingParams) -> list[int]:
        """Tokens that may not be sampled before min_tokens: EOS (unless ignore_eos) and stop ids."""
        ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        return sorted(t for t in ids if t < self.model_config.vocab_size)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free everything it holds at once (no-op if unknown/finished)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                self._finish(seq, "abort", None)
        flight = self._flight
        if flight is not None and all(seq.finished for seq in flight.seqs):
            self.decode_loop.collect(flight.handle, len(flight.seqs))     # nothing left to take from it
            self._flight = None
        self._record(self._stats())      # no tick may follow: publish the freed pages now

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the tick ---------------------------------------------------------------------------
    def _stats(self) -> TickStats:
        nr = self.model_config.mor.num_recursions
        return TickStats(depth_occupancy=[0] * nr, exits_per_depth=[0] * nr)

    def step(self) -> list[RequestOutput]:
        """One tick, or, when the decode loop applies, several ticks run on the device. When the
        engine falls idle, a zero-work TickStats follows the last tick's (no tick may follow it,
        and per-tick gauges must not keep the last tick's load)."""
        outputs = self._step()
        if not self.requests:
            self._record(self._stats())
        return outputs

    def _step(self) -> list[RequestOutput]:
        if self.decode_loop is not None:
            if self._flight is not None:
                return self._loop_continue()
            steps = self._loop_steps()
            if steps > 1 and self.blocks.reserve_ahead([s.seq_id for s in self.scheduler.running],
                                                       self.decode_loop.entries_bound(steps)):
                return self._loop_start(steps)
        self._apply_depth_policy()
        stats = self._stats()
        sched, runner = self.scheduler, self.runner
        reserved = sum(runner.block_pages_needed(self._in_block()).values())
        new = sched.schedule(reserved)
        if new:
            runner.prologue(new)
            stats.num_prologue_tokens = sum(c.n for c in new)
        while True:
            active = sched.ensure_pages(self._in_block(), runner.block_pages_needed)
            if not active:
                break
            step = runner.block_step(active)
            stats.num_block_steps += 1
            for d, (occ, ex) in enumerate(zip(step.occupancy, step.exits)):
                stats.depth_occupancy[d] += occ
                stats.exits_per_depth[d] += ex
            if self.args.batching == "depthwise":
                break
        stats.num_block_tokens = sum(stats.depth_occupancy)
        done = [c for c in self._in_flight() if not c.in_block]
        touched = self._finish_chunks(done, stats) if done else set()
        self._record(stats)
        return self._outputs(touched)

    def _apply_depth_policy(self) -> None:
        """Feed the depth policy this tick's load; when its cap moves, the positions not yet in the
        model of every sequence that allows depth reduction take min(its own max_depth, cap)."""
        sched = self.scheduler
        queue_time = time.monotonic() - sched.waiting[0].request.arrival_time if sched.waiting else 0.0
        if self.depth_policy.update(queue_time, self.blocks.usage()):
            for seq in itertools.chain(sched.running, sched.waiting):
                if seq.request.params.allow_depth_reduction:
                    seq.caps.set_from(seq.embedded, min(seq.request.max_depth, self.depth_policy.cap))

    # ---- multi-step greedy decoding on the device -----------------------------------------------
    def _loop_steps(self) -> int:
        """Ticks the decode loop may run now: 0 unless every running sequence decodes greedily or by
        plain temperature sampling (single-token chunks, no penalties, bans, truncation or top-N
        logprobs) and no waiting request could
        be admitted; at most what the context leaves every sequence. A sequence that reaches
        max_tokens or a stop inside the loop keeps its row busy to the end of the loop, and the
        tokens past its end are dropped."""
        seqs, steps = self.scheduler.running, self.args.num_scheduler_steps
        if not seqs or (self.scheduler.waiting and len(seqs) < self.args.max_num_seqs):
            return 0
        for seq in seqs:
            p = seq.request.params
            truncates = p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0
            if (truncates or p.logprobs not in (None, 0) or p.repetition_penalty != 1.0
                    or p.presence_penalty or p.frequency_penalty or len(seq.output_ids) < p.min_tokens):
                return 0
            chunk = seq.chunk
            pending = seq.num_computed == len(seq.token_ids) - 1 if chunk is None else chunk.n == chunk.num_active == 1
            if not pending or (chunk is not None and seq.caps.at(chunk.start) != seq.caps.current):
                return 0      # (the loop routes a row's tokens with one cap)
            steps = min(steps, self.max_model_len - len(seq.token_ids))
        if sum(seq.chunk is None for seq in seqs) > self.runner.num_free_slots:
            return 0          # every row holds a pool slot for the whole loop
        return steps

    def _loop_start(self, steps: int) -> list[RequestOutput]:
        """Load the running sequences into the decode loop and launch `steps` ticks."""
        seqs = list(self.scheduler.running)
        self.decode_loop.load(seqs)
        self._flight = LoopFlight(seqs, steps, self.decode_loop.launch(steps))
        return self._loop_continue()

    def _loop_continue(self) -> list[RequestOutput]:
        """Collect the loop in flight. When nothing stands in the way (no sequence ended or was
        aborted, nothing admissible waiting, pages and context for two more loops), the next loop
        is launched first, so the device computes it while the host handles this one's tokens;
        otherwise the state comes back to the per-tick engine."""
        flight, loop = self._flight, self.decode_loop
        chained = None
        if self._can_chain(flight):
            loop.refresh_tables(flight.seqs)
            chained = loop.launch(flight.steps)
        out = loop.collect(flight.handle, len(flight.seqs))
        touched = self._take_tokens(flight.seqs, out, trim=chained is None)
        if chained is not None and any(seq.finished for seq in flight.seqs):
            out = loop.collect(chained, len(flight.seqs))            # drain: its rows finish idle
            touched |= self._take_tokens(flight.seqs, out, trim=True)
            chained = None
        if chained is not None:
            self._flight = LoopFlight(flight.seqs, flight.steps, chained)
        else:
            for b, seq in enumerate(flight.seqs):
                if not seq.finished:
                    self._take_back(seq, out, b)
            self._flight = None
        return self._outputs(touched)

    def _can_chain(self, flight: "LoopFlight") -> bool:
        """Pages are reserved relative to the lengths the host knows, which lag the device by the
        loop in flight: the next loop needs room for two loops' entries."""
        seqs, steps = flight.seqs, flight.steps
        if any(seq.finished for seq in seqs) or (self.scheduler.waiting and len(seqs) < self.args.max_num_seqs):
            return False
        if any(self.max_model_len - len(seq.token_ids) < 2 * steps for seq in seqs):
            return False
        return self.blocks.reserve_ahead([seq.seq_id for seq in seqs], self.decode_loop.entries_bound(2 * steps))

    def _take_tokens(self, seqs: list[Sequence], out: LoopOutput, trim: bool) -> set[Request]:
        """A finished loop's tokens, sequence by sequence, and its KV lengths; publishes one
        TickStats per tick. Sequences that ended (or were aborted) before are skipped."""
        generated = [0] * len(out.tokens)
        touched: set[Request] = set()
        rows = zip(seqs, out.lengths.tolist(), out.tokens.T.tolist(), out.depths.T.tolist(), out.logprobs.T.tolist())
        for seq, lengths, tokens, depths, logprobs in rows:
            if seq.finished:
                continue
            self.blocks.commit_lengths(seq.seq_id, lengths, trim)
            ticks = [k for k, token in enumerate(tokens) if token != -1]
            kept = self._append_burst(seq, [tokens[k] for k in ticks], [depths[k] for k in ticks],
                                      [logprobs[k] for k in ticks])
            for k in ticks[:kept]:
                generated[k] += 1
            if kept:
                touched.add(seq.request)
        for k, count in enumerate(generated):
            self._record(self._loop_tick_stats(out, k, count))
        return touched

    def _loop_tick_stats(self, out: LoopOutput, k: int, generated: int) -> TickStats:
        stats = self._stats()
        stats.depth_occupancy, stats.exits_per_depth = out.occupancy[k].tolist(), out.exits[k].tolist()
        stats.num_block_tokens = sum(stats.depth_occupancy)
        stats.num_prologue_tokens = int(out.prologue_tokens[k])
        stats.num_epilogue_tokens = sum(stats.exits_per_depth)
        stats.num_generated_tokens = generated
        stats.num_block_steps = self.model_config.mor.num_recursions if self.decode_loop.depth_sync else 1
        return stats

    def _take_back(self, seq: Sequence, out: LoopOutput, row: int) -> None:
        """The loop's final state of a sequence as the engine's own: its token in flight (or none)."""
        pos, depth = int(out.position[row]), int(out.depth[row])
        slots = seq.chunk.slots
        seq.num_computed = pos
        seq.embedded = max(seq.embedded, pos + (depth != 0))
        if depth == 0:                       # next token sampled, not in the model yet
            self.runner.release_slots(slots)
            seq.chunk = None
            return
        target = [int(out.target[row])] if self.model_config.mor.router == "token" else None
        seq.chunk = Chunk(seq=seq, start=pos, token_ids=[seq.token_ids[pos]], slots=slots, depth=depth,
                          active=[True], num_active=1, taken=[depth - 1], target_depth=target)

    def _in_flight(self) -> list[Chunk]:
        return [s.chunk for s in self.scheduler.running if s.chunk is not None]

    def _in_block(self) -> list[Chunk]:
        return [s.chunk for s in self.scheduler.running if s.chunk is not None and s.chunk.num_active]

    def _finish_chunks(self, chunks: list[Chunk], stats: TickStats) -> set[Request]:
        """Epilogue and LM head over the finished chunks, then prompt logprobs and sampling, each
        batched over every row of the tick."""
        rows = [self._logit_rows(c) for c in chunks]
        logits = self.runner.epilogue(chunks, rows)
        stats.num_epilogue_tokens = sum(c.n for c in chunks)
        prompt_rows, prompt_targets, prompt_nums, prompt_reqs = [], [], [], []
        sample_rows, sampling, sample_seqs = [], [], []
        offset = 0
        for chunk, want in zip(chunks, rows):
            seq, req = chunk.seq, chunk.seq.request
            seq.chunk = None
            seq.num_computed = chunk.end
            if chunk.start < seq.prompt_len and self.blocks.prefix is not None:
                self._cache_prompt(chunk)
            samples = chunk.end == len(seq.token_ids)
            for i, row in enumerate(want[: len(want) - samples]):
                prompt_rows.append(offset + i)
                prompt_targets.append(req.prompt_token_ids[chunk.start + row + 1])
                prompt_nums.append(req.params.prompt_logprobs)
                prompt_reqs.append(req)
            if samples:
                sample_rows.append(offset + len(want) - 1)
                sampling.append(self._sampling_row(seq))
                sample_seqs.append((seq, int(chunk.taken[-1])))
            offset += len(want)
        if prompt_rows:
            entries = prompt_logprobs(self._rows(logits, prompt_rows), prompt_targets, prompt_nums)
            for req, entry in zip(prompt_reqs, entries):
                req.prompt_logprobs.append(entry)
        touched: set[Request] = set()
        if sample_rows:
            for (seq, depth), result in zip(sample_seqs, sample(self._rows(logits, sample_rows), sampling)):
                self._append_token(seq, result, depth)
                touched.add(seq.request)
            stats.num_generated_tokens = len(sample_rows)
        return touched

    def _cache_prompt(self, chunk: Chunk) -> None:
        """Record the depths of a finished chunk's prompt positions and cache the full prompt
        blocks they complete (prefix_cache.py)."""
        seq, req = chunk.seq, chunk.seq.request
        end = min(chunk.end, req.prompt_len)
        del seq.prompt_depths[chunk.start:]
        seq.prompt_depths += chunk.taken[: end - chunk.start]
        if len(seq.prompt_depths) == end:
            self.blocks.cache_prompt(seq.seq_id, req.prompt_token_ids, seq.caps.span(0, end), seq.prompt_depths,
                                     req.router_threshold)

    @staticmethod
    def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return logits.index_select(0, torch.tensor(rows, device=logits.device))

    def _logit_rows(self, chunk: Chunk) -> list[int]:
        """Rows of the chunk that need logits: prompt positions whose logprobs are still to be
        recorded (first completion only), then the last row if the chunk ends the sequence."""
        seq, req = chunk.seq, chunk.seq.request
        rows = []
        if req.prompt_logprobs is not None and seq.index == 0:
            first = max(chunk.start, len(req.prompt_logprobs) - 1)
            last = min(chunk.end, req.prompt_len - 1)
            rows = [p - chunk.start for p in range(first, last)]
        if chunk.end == len(seq.token_ids):
            rows.append(chunk.n - 1)
        return rows

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.request.params
        banned = self._banned_ids(params) if len(seq.output_ids) < params.min_tokens else []
        return SamplingRow(params, seq.request.prompt_token_ids, seq.output_ids, banned, seq.seed,
                           len(seq.token_ids))

    def _append_token(self, seq: Sequence, result: Sampled | None, depth: int) -> None:
        if result is None:      # nothing left to sample (non-finite logits): fail this sequence only
            logger.error("request %s: no finite logit to sample from; aborting its sequence %d",
                         seq.request.request_id, seq.index)
            self._finish(seq, "abort", None)
        else:
            seq.token_ids.append(result.token)
            seq.depths.append(depth)
            seq.cumulative_logprob += result.logprob
            if result.top is not None:
                seq.logprobs.append(result.top)
            self._check_stop(seq, result.token)
        self._retire_if_finished(seq)

    def _append_burst(self, seq: Sequence, tokens: list[int], depths: list[int], logprobs: list[float]) -> int:
        """The decode loop's tokens for one sequence, in order, up to its first stop (EOS, a stop
        token id, max_tokens, the context), with the stop rules of _check_stop; the rest are
        dropped. Stop strings need the text after every token: those go one by one. A -2 marks a
        row that had no finite logit: the sequence fails there. Returns how many tokens were kept."""
        params = seq.request.params
        with_top = params.logprobs == 0
        failed = next((i for i, token in enumerate(tokens) if token < 0), None)
        if failed is not None:
            tokens, depths, logprobs = tokens[:failed], depths[:failed], logprobs[:failed]
        if params.stop:
            kept = 0
            for token, depth, logprob in zip(tokens, depths, logprobs):
                if seq.finished:
                    break
                self._append_token(seq, Sampled(token, logprob, {token: logprob} if with_top else None), depth)
                kept += 1
        else:
            kept = self._append_checked(seq, tokens, depths, logprobs, with_top)
        if failed is not None and not seq.finished:
            self._append_token(seq, None, 0)
        return kept

    def _append_checked(self, seq: Sequence, tokens: list[int], depths: list[int], logprobs: list[float],
                        with_top: bool) -> int:
        """Append tokens up to the first that ends the output (the rules of _check_stop without
        stop strings), at once."""
        params = seq.request.params
        n_out, total = len(seq.output_ids), len(seq.token_ids)
        kept, end = len(tokens), None
        for i, token in enumerate(tokens, 1):
            end = self._token_end(params, token, n_out + i, total + i)
            if end is not None:
                kept = i
                break
        seq.token_ids.extend(tokens[:kept])
        seq.depths.extend(depths[:kept])
        seq.cumulative_logprob += sum(logprobs[:kept])
        if with_top:
            seq.logprobs.extend({t: lp} for t, lp in zip(tokens[:kept], logprobs[:kept]))
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=params.skip_special_tokens)
        if end is not None:
            self._finish(seq, *end)
        self._retire_if_finished(seq)
        return kept

    def _retire_if_finished(self, seq: Sequence) -> None:
        if seq.finished:
            self.scheduler.remove(seq)
            if seq.request.finished:
                self.requests.pop(seq.request.request_id, None)

    def _token_end(self, params: SamplingParams, token: int, n_out: int, total: int,
                   stop_strings: Callable[[], str | None] | None = None) -> tuple[str, int | str | None] | None:
        """(finish reason, stop reason) if `token`, making the output n_out and the sequence
        `total` tokens long, ends it: EOS, a stop token id, a stop string (found by
        `stop_strings`), all once min_tokens are out; then max_tokens or the context."""
        if n_out >= params.min_tokens:
            if token in self.eos_ids and not params.ignore_eos:
                return "stop", None
            if token in params.stop_token_ids:
                return "stop", token
            found = stop_strings() if stop_strings is not None else None
            if found is not None:
                return "stop", found
        if n_out >= params.max_tokens or total >= self.max_model_len:
            return "length", None
        return None

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop: int | str | None) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.request.params
        prev_len = len(seq.text)
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=params.skip_special_tokens)

        def stop_string() -> str | None:
            for s in params.stop:
                at = seq.text.find(s, max(0, prev_len - len(s) + 1))
                if at >= 0:
                    seq.text = seq.text[: at + len(s) if params.include_stop_str_in_output else at]
                    return s
            return None

        end = self._token_end(params, token, len(seq.output_ids), len(seq.token_ids), stop_string)
        if end is not None:
            self._finish(seq, *end)

    def _record(self, stats: TickStats) -> None:
        stats.kv_blocks_used = dict(enumerate(self.blocks.blocks_used_per_stage()))
        stats.kv_usage = self.blocks.usage()
        stats.num_running = self.num_running
        stats.num_waiting = self.num_waiting
        stats.num_preemptions = self.scheduler.num_preemptions
        stats.depth_cap = self.depth_policy.cap
        if self.blocks.prefix is not None:
            stats.prefix_cache_queries, stats.prefix_cache_hits = self.blocks.prefix.queries, self.blocks.prefix.hits
        for d, occ in enumerate(stats.depth_occupancy):
            self.total_depth_token_ticks[d] += occ
        self.last_tick = stats
        for listener in self.tick_listeners:
            listener(stats)

    def _outputs(self, touched: set[Request]) -> list[RequestOutput]:
        return [self._output(req) for req in touched if req.finished or req.params.output_kind == "cumulative"]

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.text
            if not seq.finished and text.endswith("\ufffd"):
                text = text.rstrip("\ufffd")       # hold back an incomplete UTF-8 character
            outs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(seq.output_ids), depths=list(seq.depths),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if req.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                             prompt_token_ids=list(req.prompt_token_ids), outputs=outs,
                             prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
                             finished=req.finished, num_preemptions=req.num_preemptions)

    def check_no_leak(self) -> bool:
        """True when nothing is in flight and every KV page and pool row is free."""
        return (self._flight is None and self.blocks.all_free() and not self.scheduler.running
                and not self.scheduler.waiting
                and self.runner.num_free_slots == self.runner.pool_size)
