"""The synchronous engine: requests in, one tick per `step()`, RequestOutputs out.

One tick (depth-wise mode), the per-tick driver of the phases in tick.py:
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
temperature sampling, step() instead hands K ticks of the same phases to the device decode loop
(multi_step.py, decode_loop.py) and takes their tokens back at once.

The engine's other jobs live beside it: output processing and stop rules (output_processor.py),
per-tick statistics (stats.py), the cache-stage map (stages.py).

The depth reported for a generated token is the number of recursions taken by the position that
produced it (the last input token); the dense reference's `depths[prompt_len - 1 + i]`.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Callable

import torch

from morserve.config import ModelConfig
from morserve.engine.args import EngineArgs
from morserve.engine.cuda_graphs import graph_sizes
from morserve.engine.decode_loop import DecodeLoop
from morserve.engine.depth import check_depth_params, request_max_depth, request_threshold
from morserve.engine.depth_policy import DepthPolicy
from morserve.engine.input_checks import EngineLimits, banned_ids, check_request, prompt_token_ids
from morserve.engine.kv_cache import BlockManager
from morserve.engine.multi_step import LoopFlight, MultiStep
from morserve.engine.output_processor import OutputProcessor, finish
from morserve.engine.prefix_cache import cache_scope
from morserve.engine.outputs import RequestOutput
from morserve.engine.request_failures import sample_each
from morserve.engine.runner import ModelRunner
from morserve.engine.sampler import Sampled, SamplingRow, as_int64, is_plain, plain_tail, prompt_logprobs
from morserve.engine.sampling_params import SamplingParams
from morserve.engine.scheduler import Scheduler
from morserve.engine.sequence import Chunk, Request, Sequence
from morserve.engine.stages import CacheStages
from morserve.engine.stats import TickRecorder, TickStats
from morserve.engine.structured import StructuredBackend
from morserve.model.mor import MoRModel

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "TickStats"]


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
        self.stages = CacheStages(cfg)
        param = next(model.parameters())
        page_bytes = 2 * args.block_size * cfg.num_key_value_heads * cfg.head_dim * param.element_size()
        self._worst_pages = lambda n: self.stages.worst_pages(n, args.block_size)
        num_pages = args.num_pages(page_bytes, self._worst_pages(self.max_model_len), param.device)
        self.blocks = BlockManager(num_pages, args.block_size, self.stages.layers_per_stage,
                                   args.enable_prefix_caching)
        self.runner = ModelRunner(self.model, self.blocks, self.stages, args.max_num_batched_tokens,
                                  self.max_model_len)
        max_graph = min(args.cuda_graph_max_tokens, args.max_num_batched_tokens)
        cuda_graphs = self.runner.device.type == "cuda" and not args.enforce_eager
        if cuda_graphs and max_graph > 0:
            self.runner.use_graphs(graph_sizes(max_graph), self.max_model_len, capture=True)
        self.scheduler = Scheduler(self.blocks, args.max_num_seqs, args.max_num_batched_tokens,
                                   self.runner.release_slots)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._rng = torch.Generator().manual_seed(args.seed)
        self.eos_ids = set(tokenizer.eos_token_ids if tokenizer is not None else cfg.eos_token_ids)
        self.structured = StructuredBackend(tokenizer, cfg.vocab_size, sorted(self.eos_ids)) if tokenizer else None
        self.limits = EngineLimits(cfg.vocab_size, self.max_model_len, frozenset(self.eos_ids), num_pages,
                                   self._worst_pages, getattr(tokenizer, "max_token_chars", None))
        self.depth_policy = DepthPolicy(args.depth_policy, args.depth_policy_metric, args.depth_policy_target,
                                        cfg.mor.num_recursions)
        self.recorder = TickRecorder(cfg.mor.num_recursions, self.blocks, self.scheduler, self.depth_policy)
        self.processor = OutputProcessor(tokenizer, self.eos_ids, self.max_model_len, self._retire)
        self.decode_loop: DecodeLoop | None = None
        self.multi_step: MultiStep | None = None
        if args.num_scheduler_steps > 1:
            self.decode_loop = DecodeLoop(self.runner, args.max_num_seqs, self.max_model_len,
                                          args.num_scheduler_steps, args.batching == "vanilla", cuda_graphs)
            self.multi_step = MultiStep(self.decode_loop, args.num_scheduler_steps, args.max_num_seqs,
                                        self.max_model_len, self.scheduler, self.blocks, self.runner,
                                        self.processor, self.recorder)

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

    # ---- statistics ---------------------------------------------------------------------------
    @property
    def tick_listeners(self) -> list[Callable[[TickStats], None]]:
        return self.recorder.listeners

    @property
    def last_tick(self) -> TickStats:
        return self.recorder.last

    @property
    def total_depth_token_ticks(self) -> list[int]:
        return self.recorder.total_depth_token_ticks

    @property
    def _flight(self) -> LoopFlight | None:
        return self.multi_step.flight if self.multi_step is not None else None

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> Request:
        """Validate and queue a request; raises ValueError naming the problem."""
        params = params or SamplingParams()
        params.validate()
        mor = self.model_config.mor
        check_depth_params(params, mor)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = prompt_token_ids(prompt, self.tokenizer, self.limits)
        max_tokens = check_request(ids, params, self.limits)
        grammar = self._compile_grammar(params)
        if params.max_tokens is None:
            params = SamplingParams(**{**params.__dict__, "max_tokens": max_tokens})
        req = Request(request_id, text, ids, params, max_depth=request_max_depth(params, mor),
                      router_threshold=request_threshold(params, mor))
        req.cache_scope = cache_scope(req.router_threshold, params.cache_salt)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), req, i, list(ids), self._seed(params, i),
                           grammar=self.structured.state(grammar) if grammar is not None else None)
            if params.allow_depth_reduction:
                seq.caps.set_from(0, min(req.max_depth, self.depth_policy.cap))
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return req

    def _compile_grammar(self, params: SamplingParams):
        """The request's compiled structured-output constraint, if it has one."""
        if params.structured_outputs is None:
            return None
        if self.structured is None:
            raise ValueError("structured outputs need the model's tokenizer; this model has none")
        return self.structured.compile(params.structured_outputs)

    def _seed(self, params: SamplingParams, index: int) -> int:
        """Completion `index`'s sampling seed: from the request's seed (any integer, reduced mod
        2**64) or, unseeded, drawn from the engine's own generator."""
        if params.seed is not None:
            return (params.seed * 1_000_003 + index) % 2**64
        return int(torch.randint(0, 2**62, (1,), generator=self._rng))

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free everything it holds at once (no-op if unknown/finished)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                finish(seq, "abort", None)
        if self.multi_step is not None:
            self.multi_step.drop_if_idle()
        self.recorder.record(self.recorder.empty())      # no tick may follow: publish the freed pages now

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def _retire(self, seq: Sequence) -> None:
        """A sequence finished: free what it holds; the request goes once all its sequences did."""
        self.scheduler.remove(seq)
        if seq.request.finished:
            self.requests.pop(seq.request.request_id, None)

    # ---- the tick ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One tick, or, when the decode loop applies, several ticks run on the device. When the
        engine falls idle, a zero-work TickStats follows the last tick's (no tick may follow it,
        and per-tick gauges must not keep the last tick's load)."""
        outputs = self.processor.outputs(self._step())
        if not self.requests:
            self.recorder.record(self.recorder.empty())
        return outputs

    def _step(self) -> set[Request]:
        multi = self.multi_step
        if multi is not None and (multi.flight is not None or multi.try_start()):
            return multi.advance()
        self._apply_depth_policy()
        stats = self.recorder.empty()
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
            self.recorder.add_block_step(stats, step.occupancy, step.exits)
            if self.args.batching == "depthwise":
                break
        done = [c for c in self._in_flight() if not c.in_block]
        touched = self._finish_chunks(done, stats) if done else set()
        self.recorder.record(stats)
        return touched

    def _apply_depth_policy(self) -> None:
        """Feed the depth policy this tick's load; when its cap moves, the positions not yet in the
        model of every sequence that allows depth reduction take min(its own max_depth, cap)."""
        sched = self.scheduler
        queue_time = time.monotonic() - sched.waiting[0].request.arrival_time if sched.waiting else 0.0
        if self.depth_policy.update(queue_time, self.blocks.usage()):
            for seq in itertools.chain(sched.running, sched.waiting):
                if seq.request.params.allow_depth_reduction:
                    seq.caps.set_from(seq.embedded, min(seq.request.max_depth, self.depth_policy.cap))

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
            sample_logits = logits if len(sample_rows) == len(logits) else self._rows(logits, sample_rows)
            for (seq, depth), result in zip(sample_seqs, self._sample(sample_logits, sampling)):
                if isinstance(result, Exception):
                    self._fail(seq.request, result)
                elif not seq.finished:       # (another sequence of a failed request)
                    self.processor.append_token(seq, result, depth)
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
                                     req.cache_scope)

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[Sampled | None | Exception]:
        """The sampler; a batch of plain rows (sampler.is_plain) takes the decode loop's tail. A
        row whose sampling raises gets its exception in place of its result (request_failures)."""
        if not all(is_plain(row.params, row.banned) for row in rows):
            return sample_each(logits, rows)
        dev = logits.device
        temperatures = torch.tensor([row.params.temperature for row in rows], dtype=torch.float32, device=dev)
        seeds = torch.tensor([as_int64(row.seed) for row in rows], device=dev)
        positions = torch.tensor([row.position for row in rows], device=dev)
        tokens, logprobs, valid = plain_tail(logits, temperatures, seeds, positions,
                                             any(not row.params.greedy for row in rows))
        out: list[Sampled | None] = []
        for row, token, logprob, ok in zip(rows, tokens.tolist(), logprobs.tolist(), valid.tolist()):
            top = {token: logprob} if row.params.logprobs == 0 else None
            out.append(Sampled(token, logprob, top) if ok else None)
        return out

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
        banned = banned_ids(params, self.limits) if len(seq.output_ids) < params.min_tokens else []
        allowed = seq.grammar.next_mask(seq.output_ids) if seq.grammar is not None else None
        return SamplingRow(params, seq.request.prompt_token_ids, seq.output_ids, banned, seq.seed,
                           len(seq.token_ids), allowed)

    def _fail(self, req: Request, exc: Exception) -> None:
        """A failure that is this request's alone (its sampling raised): it ends with the error,
        every other request goes on."""
        logger.error("request %s failed: %r", req.request_id, exc)
        req.error = f"request failed: {type(exc).__name__}: {exc}"
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                finish(seq, "abort", None)
        self.requests.pop(req.request_id, None)

    def check_no_leak(self) -> bool:
        """True when nothing is in flight and every KV page and pool row is free."""
        return (self._flight is None and self.blocks.all_free() and not self.scheduler.running
                and not self.scheduler.waiting
                and self.runner.num_free_slots == self.runner.pool_size)
