"""Prometheus metrics of one app (its own CollectorRegistry, no global state).

vLLM's names under the `morserve:` prefix (label `model_name`), fed by the engine's per-tick
`TickStats` (engine thread; prometheus-client is thread-safe) and by per-request timings taken as
outputs reach the server, plus the MoR ones: tokens at each recursion depth in the last tick,
token-ticks and exits per depth, KV blocks per cache stage (`depth="0"`: prologue/epilogue).
`vllm_names` also exports vLLM's own gauge names so existing vLLM dashboards light up.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from morserve.engine import RequestOutput, TickStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics:
    def __init__(self, model_name: str, vllm_names: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        reg, name = self.registry, ["model_name"]
        depth = ["model_name", "depth"]
        self.running = Gauge("morserve:num_requests_running", "Sequences running in the engine.", name, registry=reg)
        self.waiting = Gauge("morserve:num_requests_waiting", "Sequences waiting to be scheduled.", name, registry=reg)
        self.kv_usage = Gauge("morserve:kv_cache_usage_perc", "KV-cache usage (1 = full).", name, registry=reg)
        self.prompt_tokens = Counter("morserve:prompt_tokens", "Prompt tokens of finished requests.", name,
                                     registry=reg)
        self.generation_tokens = Counter("morserve:generation_tokens", "Generated tokens.", name, registry=reg)
        self.success = Counter("morserve:request_success", "Finished sequences by finish reason.",
                               ["model_name", "finished_reason"], registry=reg)
        self.preemptions = Counter("morserve:num_preemptions", "Sequences preempted.", name, registry=reg)
        self.prefix_queries = Counter("morserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      name, registry=reg)
        self.prefix_hits = Counter("morserve:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   name, registry=reg)
        self._prefix_seen = (0, 0)
        self.depth_cap = Gauge("morserve:depth_policy_cap", "Depth cap of requests that allow depth reduction.",
                               name, registry=reg)
        self.ttft = Histogram("morserve:time_to_first_token_seconds", "Time to first token.", name,
                              buckets=TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("morserve:inter_token_latency_seconds", "Time between two tokens of a sequence.",
                             name, buckets=ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("morserve:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             name, buckets=E2E_BUCKETS, registry=reg)
        self.iteration_tokens = Histogram("morserve:iteration_tokens_total", "Tokens entering the model per tick.",
                                          name, buckets=ITERATION_TOKEN_BUCKETS, registry=reg)
        self.depth_occupancy = Gauge("morserve:depth_occupancy", "Tokens at each recursion depth in the last tick.",
                                     depth, registry=reg)
        self.depth_token_ticks = Counter("morserve:depth_token_ticks", "Token-ticks spent at each recursion depth.",
                                         depth, registry=reg)
        self.exit_depth = Counter("morserve:exit_depth", "Tokens leaving the recursion block at each depth.",
                                  depth, registry=reg)
        self.kv_blocks = Gauge("morserve:kv_blocks_used", "KV blocks in use per cache stage (0 = prologue/epilogue).",
                               depth, registry=reg)
        self.vllm_gauges: list[tuple[Gauge, str]] = []
        if vllm_names:
            for vname, attr, text in (("vllm:num_requests_running", "num_running", "Running sequences."),
                                      ("vllm:num_requests_waiting", "num_waiting", "Waiting sequences."),
                                      ("vllm:kv_cache_usage_perc", "kv_usage", "KV-cache usage (1 = full).")):
                self.vllm_gauges.append((Gauge(vname, text, name, registry=reg), attr))
        self._preemptions_seen = 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_tick(self, stats: TickStats) -> None:
        """Engine tick listener (runs in the engine thread)."""
        m = self.model_name
        self.running.labels(m).set(stats.num_running)
        self.waiting.labels(m).set(stats.num_waiting)
        self.kv_usage.labels(m).set(stats.kv_usage)
        for gauge, attr in self.vllm_gauges:
            gauge.labels(m).set(getattr(stats, attr))
        if stats.num_preemptions > self._preemptions_seen:
            self.preemptions.labels(m).inc(stats.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions
        self.depth_cap.labels(m).set(stats.depth_cap)
        queries, hits = self._prefix_seen
        self.prefix_queries.labels(m).inc(stats.prefix_cache_queries - queries)
        self.prefix_hits.labels(m).inc(stats.prefix_cache_hits - hits)
        self._prefix_seen = (stats.prefix_cache_queries, stats.prefix_cache_hits)
        self.generation_tokens.labels(m).inc(stats.num_generated_tokens)
        if stats.num_prologue_tokens:
            self.iteration_tokens.labels(m).observe(stats.num_prologue_tokens)
        for d, (occupancy, exits) in enumerate(zip(stats.depth_occupancy, stats.exits_per_depth), start=1):
            self.depth_occupancy.labels(m, str(d)).set(occupancy)
            self.depth_token_ticks.labels(m, str(d)).inc(occupancy)
            self.exit_depth.labels(m, str(d)).inc(exits)
        for stage, blocks in stats.kv_blocks_used.items():
            self.kv_blocks.labels(m, str(stage)).set(blocks)

    def request_timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Timings of one engine request: TTFT, the gap before every later token of each sequence,
    end-to-end latency; counted once when the request ends (finished or aborted)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.last_token: dict[int, tuple[int, float]] = {}     # seq index -> (tokens seen, time)
        self.latest: RequestOutput | None = None

    def on_output(self, out: RequestOutput) -> None:
        t = time.monotonic()
        m = self.metrics.model_name
        if self.first_token is None:
            self.first_token = t
            self.metrics.ttft.labels(m).observe(t - self.start)
        for comp in out.outputs:
            seen, when = self.last_token.get(comp.index, (0, t))
            if len(comp.token_ids) > seen:
                if seen:
                    self.metrics.itl.labels(m).observe(t - when)
                self.last_token[comp.index] = (len(comp.token_ids), t)
        self.latest = out

    def done(self) -> None:
        """The request ended: count its tokens and how each sequence finished (abort if unfinished)."""
        m = self.metrics.model_name
        self.metrics.e2e.labels(m).observe(time.monotonic() - self.start)
        if self.latest is None:
            self.metrics.success.labels(m, "abort").inc()
            return
        self.metrics.prompt_tokens.labels(m).inc(len(self.latest.prompt_token_ids))
        for comp in self.latest.outputs:
            self.metrics.success.labels(m, comp.finish_reason or "abort").inc()
