"""Prometheus metrics of one app (its own CollectorRegistry, no global state).

vLLM's metric set under the `morserve:` prefix (label `model_name`), fed by the engine's per-tick
`TickStats` (engine thread; prometheus-client is thread-safe) and by per-request timings taken as
outputs reach the server (queue / prefill / decode / inference phases from the engine's arrival
and first-scheduled times), plus the MoR ones: tokens at each recursion depth in the last tick,
token-ticks and exits per depth, KV blocks per cache stage (`depth="0"`: prologue/epilogue).
Every label value is exported from the start (0 until it moves), so panels show 0, not "No data".
`vllm_names` also exports each metric vLLM has under its `vllm:` name (vLLM dashboards, gateways
and autoscalers read those), including the deprecated `gpu_cache_usage_perc` and
`time_per_output_token_seconds`; the aliases are rendered from the same samples.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from morserve.engine import RequestOutput, SamplingParams, TickStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))      # vLLM's 1-2-5 series
N_BUCKETS = (1, 2, 5, 10, 20)
FINISH_REASONS = ("stop", "length", "abort")
# our name -> the extra names it is also exported under (vLLM's deprecated spellings)
SYNONYMS = {"kv_cache_usage_perc": ("gpu_cache_usage_perc",),
            "inter_token_latency_seconds": ("time_per_output_token_seconds",)}
MOR_ONLY = ("depth_occupancy", "depth_token_ticks", "exit_depth", "kv_blocks_used", "depth_policy_cap")


class _Aliases(Collector):
    """Re-exports metrics under other names (same samples, renamed)."""

    def __init__(self, pairs: list[tuple[MetricWrapperBase, str]]) -> None:
        self.pairs = pairs

    def collect(self) -> Iterator[Metric]:
        for metric, alias in self.pairs:
            for family in metric.collect():
                renamed = Metric(alias, family.documentation, family.type, family.unit)
                for s in family.samples:
                    renamed.add_sample(alias + s.name[len(family.name):], s.labels, s.value, s.timestamp,
                                       s.exemplar)
                yield renamed


class ServerMetrics:
    def __init__(self, model_name: str, vllm_names: bool = False) -> None:
        self.registry = reg = CollectorRegistry()
        self.model_name = m = model_name
        self._metrics: dict[str, MetricWrapperBase] = {}

        def add(kind, name: str, doc: str, labels: tuple[str, ...] = (), **kw):
            metric = kind(f"morserve:{name}", doc, ["model_name", *labels], registry=reg, **kw)
            self._metrics[name] = metric
            if not labels:
                metric.labels(m)               # exported at 0 from the start
            return metric

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return add(Histogram, name, doc, buckets=buckets)

        self.running = add(Gauge, "num_requests_running", "Sequences running in the engine.")
        self.waiting = add(Gauge, "num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = add(Gauge, "kv_cache_usage_perc", "KV-cache usage (1 = full).")
        self.prompt_tokens = add(Counter, "prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = add(Counter, "generation_tokens", "Generated tokens.")
        self.success = add(Counter, "request_success", "Finished sequences by finish reason.", ("finished_reason",))
        for reason in FINISH_REASONS:
            self.success.labels(m, reason)
        self.preemptions = add(Counter, "num_preemptions", "Sequences preempted.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two tokens of a sequence.", ITL_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Per request: decode time / (generated tokens - 1) of its longest sequence.",
                              ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to last token.", E2E_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time waiting before first scheduled.",
                                    E2E_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "First scheduled to first token.",
                                      E2E_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "First token to last token.", E2E_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds", "First scheduled to last token.",
                                        E2E_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.",
                                               TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Generated tokens per request (all its sequences).",
                                                   TOKEN_COUNT_BUCKETS)
        self.params_n = histogram("request_params_n", "The n request parameter.", N_BUCKETS)
        self.params_max_tokens = histogram("request_params_max_tokens", "The max_tokens request parameter.",
                                           TOKEN_COUNT_BUCKETS)
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens entering the model per tick.",
                                          ITERATION_TOKEN_BUCKETS)
        self.prefix_queries = add(Counter, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = add(Counter, "prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self._prefix_seen = (0, 0)
        self.depth_cap = add(Gauge, "depth_policy_cap", "Depth cap of requests that allow depth reduction.")
        self.cache_info: Gauge | None = None
        depth = ("depth",)
        self.depth_occupancy = add(Gauge, "depth_occupancy", "Tokens at each recursion depth in the last tick.",
                                   depth)
        self.depth_token_ticks = add(Counter, "depth_token_ticks", "Token-ticks spent at each recursion depth.",
                                     depth)
        self.exit_depth = add(Counter, "exit_depth", "Tokens leaving the recursion block at each depth.", depth)
        self.kv_blocks = add(Gauge, "kv_blocks_used", "KV blocks in use per cache stage (0 = prologue/epilogue).",
                             depth)
        self._vllm_names = vllm_names
        reg.register(_Aliases(self._alias_pairs()))
        self._preemptions_seen = 0

    def _alias_pairs(self) -> list[tuple[MetricWrapperBase, str]]:
        pairs = [(self._metrics[name], f"morserve:{alias}") for name, aliases in SYNONYMS.items() for alias in aliases]
        if self._vllm_names:
            for name, metric in self._metrics.items():
                if name not in MOR_ONLY:
                    pairs += [(metric, f"vllm:{alias}") for alias in (name, *SYNONYMS.get(name, ()))]
        return pairs

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def engine_ready(self, num_recursions: int, num_kv_stages: int, cache_config: dict[str, str]) -> None:
        """The engine is loaded: every depth and stage label exported at 0, and vLLM's
        cache_config_info (a gauge at 1 whose labels are the KV cache's configuration)."""
        m = self.model_name
        for d in range(1, num_recursions + 1):
            for metric in (self.depth_occupancy, self.depth_token_ticks, self.exit_depth):
                metric.labels(m, str(d))
        for stage in range(num_kv_stages):
            self.kv_blocks.labels(m, str(stage))
        names = ["morserve:cache_config_info"] + (["vllm:cache_config_info"] if self._vllm_names else [])
        for name in names:
            gauge = Gauge(name, "The KV cache's configuration (labels), value 1.", ["model_name", *cache_config],
                          registry=self.registry)
            gauge.labels(m, *cache_config.values()).set(1)

    def on_tick(self, stats: TickStats) -> None:
        """Engine tick listener (runs in the engine thread)."""
        m = self.model_name
        self.running.labels(m).set(stats.num_running)
        self.waiting.labels(m).set(stats.num_waiting)
        self.kv_usage.labels(m).set(stats.kv_usage)
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

    def request_timer(self, params: SamplingParams | None = None) -> RequestTimer:
        return RequestTimer(self, params)


class RequestTimer:
    """Timings of one engine request: TTFT, the gap before every later token of each sequence,
    the phases of vLLM's request histograms; counted once when the request ends (finished or
    aborted). Times are time.monotonic(), the engine's clock."""

    def __init__(self, metrics: ServerMetrics, params: SamplingParams | None = None) -> None:
        self.metrics = metrics
        self.params = params
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.last_token_time: float | None = None
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
                self.last_token_time = t
        self.latest = out

    def done(self) -> None:
        """The request ended: count its tokens, phases and how each sequence finished (abort if
        unfinished)."""
        metrics, m, now = self.metrics, self.metrics.model_name, time.monotonic()
        metrics.e2e.labels(m).observe(now - self.start)
        if self.params is not None:
            metrics.params_n.labels(m).observe(self.params.n)
            if self.params.max_tokens is not None:
                metrics.params_max_tokens.labels(m).observe(self.params.max_tokens)
        out = self.latest
        if out is None:
            metrics.success.labels(m, "abort").inc()
            return
        generated = [len(c.token_ids) for c in out.outputs]
        metrics.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
        metrics.request_prompt_tokens.labels(m).observe(len(out.prompt_token_ids))
        metrics.request_generation_tokens.labels(m).observe(sum(generated))
        for comp in out.outputs:
            metrics.success.labels(m, comp.finish_reason or "abort").inc()
        scheduled = out.first_scheduled_time
        if out.arrival_time is not None and scheduled is not None:
            metrics.queue_time.labels(m).observe(max(0.0, scheduled - out.arrival_time))
            last = self.last_token_time or now
            metrics.inference_time.labels(m).observe(max(0.0, last - scheduled))
            if self.first_token is not None:
                metrics.prefill_time.labels(m).observe(max(0.0, self.first_token - scheduled))
                metrics.decode_time.labels(m).observe(last - self.first_token)
                if max(generated, default=0) > 1:
                    metrics.tpot.labels(m).observe((last - self.first_token) / (max(generated) - 1))


def cache_config(engine) -> dict[str, str]:
    """An AsyncLLMEngine's KV-cache configuration, as cache_config_info's labels (vLLM's names
    first, then the MoR ones)."""
    core = engine.engine
    dtype = next(core.model.parameters()).dtype
    return {"block_size": str(core.args.block_size), "num_gpu_blocks": str(core.blocks.num_pages),
            "cache_dtype": str(dtype).removeprefix("torch."),
            "gpu_memory_utilization": str(core.args.gpu_memory_utilization), "enable_prefix_caching": str(core.args.enable_prefix_caching),
            "kv_mode": core.model_config.mor.kv_mode, "num_kv_stages": str(len(core.blocks.blocks_used_per_stage()))}
