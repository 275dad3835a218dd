"""`morserve serve` / `server.py`: vLLM's flags, the FastAPI app factory, uvicorn, and shutdown.

The app answers at once; the engine is built in a daemon thread (/health 503 until it is ready) and
then runs in its own thread, so the event loop never waits on the model. SIGTERM / SIGINT drain:
/health and new generation requests answer 503, running requests finish (for at most
--shutdown-timeout seconds; then each is aborted with a 503 error body, or a final error event and
`[DONE]` for a stream), the engine stops, the process exits 0. A second signal exits at once.
Slow or oversized clients are bounded by limits.py (body size, header / body read timeouts,
keep-alive timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from types import FrameType

import uvicorn
from fastapi import FastAPI

import morserve
from morserve.api.errors import APIError, install_error_handlers
from morserve.api.limits import BodyLimitMiddleware, header_timeout_protocol
from morserve.api.metrics import ServerMetrics, cache_config
from morserve.api.middleware import RequestMiddleware
from morserve.api.routes import router
from morserve.api.state import ServerSettings, ServerState
from morserve.engine import AsyncLLMEngine, EngineArgs
from morserve.serving.ray_flags import add_ray_arguments
from morserve.threads import add_threads_flag, set_threads

logger = logging.getLogger("morserve.api")

DEFAULT_MODEL = EngineArgs.model
EngineFactory = Callable[[], AsyncLLMEngine]
ABORT_GRACE_S = 0.5            # after aborting at the shutdown timeout, for the error bodies to go out
_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BYTE_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:iB|B)?|B)?", re.IGNORECASE)


def byte_size(text: str) -> int:
    """argparse type: a positive byte count, plain (536870912) or with a binary unit (512M, 2G,
    1.5GiB, 64KB: K/M/G/T are powers of 1024); fractions of a byte are dropped."""
    match = _BYTE_SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 536870912, 512M or 2G "
                                         f"(K/M/G/T = powers of 1024), got {text!r}")
    number, unit = match.groups()
    value = int(Decimal(number) * _BYTE_UNITS[(unit or "").upper()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="morserve serve", description="OpenAI-compatible server (vLLM's flags).")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory, .gguf file or known model name")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) the API answers to (default: --model); the first is used in responses")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batching", choices=["depthwise", "vanilla"], default="depthwise")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    kv_size = p.add_mutually_exclusive_group()
    kv_size.add_argument("--num-kv-blocks", type=int, default=None,
                         help="KV pages (overrides --gpu-memory-utilization)")
    kv_size.add_argument("--kv-cache-memory-bytes", type=byte_size, default=None, metavar="BYTES",
                         help="KV-cache size in bytes, e.g. 536870912, 512M, 2G (K/M/G/T = powers of 1024; "
                              "overrides --gpu-memory-utilization)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true",
                   help="never replay CUDA graphs (they are captured on first use, per padded batch size)")
    p.add_argument("--cuda-graph-max-tokens", type=int, default=EngineArgs.cuda_graph_max_tokens,
                   help="largest block-pass batch (tokens) replayed from a CUDA graph")
    p.add_argument("--num-scheduler-steps", type=int, default=EngineArgs.num_scheduler_steps,
                   help="engine ticks per step for greedy decoding, run on the device (> 1: higher "
                        "throughput, tokens streamed in bursts of this many)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=EngineArgs.enable_prefix_caching,
                   help="share the KV blocks of common prompt prefixes between requests")
    p.add_argument("--depth-policy", choices=["fixed", "adaptive"], default=EngineArgs.depth_policy,
                   help="adaptive: lower the depth cap of requests with allow_depth_reduction while loaded")
    p.add_argument("--depth-policy-metric", choices=["queue_time", "kv_usage"], default=EngineArgs.depth_policy_metric,
                   help="the load the adaptive depth policy watches")
    p.add_argument("--depth-policy-target", type=float, default=EngineArgs.depth_policy_target,
                   help="load above which the cap drops (queue_time: seconds; kv_usage: 0..1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("MORSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API (default: $MORSERVE_API_KEY)")
    p.add_argument("--max-num-queued-reqs", type=int, default=1024,
                   help="sequences that may wait beyond --max-num-seqs; more get 429 (-1: unlimited)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    p.add_argument("--enable-force-include-usage", action="store_true",
                   help="send usage in every stream, as if stream_options.include_usage were set")
    p.add_argument("--vllm-metric-names", action="store_true",
                   help="also export every metric vLLM has under its vllm: name (for vLLM dashboards and gateways)")
    p.add_argument("--max-request-body-bytes", type=byte_size, default=ServerSettings.max_request_body_bytes,
                   metavar="BYTES", help="larger request bodies get 413 (default 16M)")
    p.add_argument("--header-read-timeout", type=float, default=ServerSettings.header_read_timeout,
                   help="seconds a connection gets to send a request's headers; then it is closed")
    p.add_argument("--body-read-timeout", type=float, default=ServerSettings.body_read_timeout,
                   help="seconds a request gets to send its whole body; then 408")
    p.add_argument("--keep-alive-timeout", type=float, default=ServerSettings.keep_alive_timeout,
                   help="seconds an idle keep-alive connection stays open")
    add_threads_flag(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_ray_arguments(p)
    return p


def engine_args(ns: argparse.Namespace) -> EngineArgs:
    """The engine's arguments from the parsed flags (ValueError naming a bad value)."""
    args = EngineArgs(model=ns.model, batching=ns.batching, max_num_seqs=ns.max_num_seqs,
                      max_num_batched_tokens=ns.max_num_batched_tokens, num_kv_blocks=ns.num_kv_blocks,
                      kv_cache_memory=ns.kv_cache_memory_bytes, gpu_memory_utilization=ns.gpu_memory_utilization,
                      block_size=ns.block_size, device=ns.device, dtype=ns.dtype, seed=ns.seed,
                      max_model_len=ns.max_model_len, enforce_eager=ns.enforce_eager,
                      cuda_graph_max_tokens=ns.cuda_graph_max_tokens, num_scheduler_steps=ns.num_scheduler_steps,
                      enable_prefix_caching=ns.enable_prefix_caching, depth_policy=ns.depth_policy,
                      depth_policy_metric=ns.depth_policy_metric, depth_policy_target=ns.depth_policy_target)
    args.validate()
    return args


def server_settings(ns: argparse.Namespace) -> ServerSettings:
    return ServerSettings(model=ns.model, served_model_names=ns.served_model_name or [ns.model],
                          max_num_seqs=ns.max_num_seqs,
                          max_num_queued_reqs=None if ns.max_num_queued_reqs < 0 else ns.max_num_queued_reqs,
                          api_key=ns.api_key, enable_force_include_usage=ns.enable_force_include_usage,
                          vllm_metric_names=ns.vllm_metric_names, max_request_body_bytes=ns.max_request_body_bytes,
                          header_read_timeout=ns.header_read_timeout, body_read_timeout=ns.body_read_timeout,
                          keep_alive_timeout=ns.keep_alive_timeout)


def uvicorn_config(app: FastAPI, **kwargs) -> uvicorn.Config:
    """uvicorn's config for the app, with the server's connection limits (limits.py)."""
    settings: ServerSettings = app.state.server.settings
    return uvicorn.Config(app, http=header_timeout_protocol(settings.header_read_timeout),
                          timeout_keep_alive=settings.keep_alive_timeout, **kwargs)


async def _build_in_thread(factory: EngineFactory) -> AsyncLLMEngine:
    """Run the factory in a daemon thread (a stuck load never blocks the process from exiting)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(setter: Callable, value: object) -> None:
        if not future.done():
            setter(value)

    def work() -> None:
        try:
            result = factory()
            loop.call_soon_threadsafe(settle, future.set_result, result)
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting coroutine
            with contextlib.suppress(RuntimeError):           # loop already closed
                loop.call_soon_threadsafe(settle, future.set_exception, exc)

    threading.Thread(target=work, name="morserve-load", daemon=True).start()
    return await future


def create_app(settings: ServerSettings, engine_factory: EngineFactory,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The app; the engine comes from `engine_factory()` (run in a thread after startup)."""
    state = ServerState(settings, ServerMetrics(settings.model_name, settings.vllm_metric_names))

    async def load() -> None:
        try:
            engine = await _build_in_thread(engine_factory)
        except Exception as exc:
            logger.exception("loading the model failed")
            state.load_error = exc
            if on_load_failure is not None:
                on_load_failure(exc)
            return
        info = cache_config(engine)
        state.metrics.engine_ready(engine.model_config.mor.num_recursions, int(info["num_kv_stages"]), info)
        engine.add_tick_listener(state.metrics.on_tick)
        state.engine = engine
        logger.info("model %s loaded; serving", settings.model)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.ensure_future(load())
        yield
        loading.cancel()
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="morserve", version=morserve.__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes,
                       timeout=settings.body_read_timeout)
    app.add_middleware(RequestMiddleware, api_key=settings.api_key)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT starting a drain instead of closing the listener at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))

    async def drain(self) -> None:
        self.state.draining = True
        logger.info("draining: %d request(s) in flight, %.0fs to finish",
                    self.state.in_flight_requests, self.shutdown_timeout)
        if not await self.state.wait_idle(self.shutdown_timeout):
            logger.warning("shutdown timeout: aborting %d request(s)", self.state.in_flight_requests)
            self.state.abort_all(APIError(503, f"the server shut down: the request was aborted after the "
                                               f"{self.shutdown_timeout:g} s drain (--shutdown-timeout)"))
            await self.state.wait_idle(ABORT_GRACE_S)
            await asyncio.sleep(ABORT_GRACE_S)           # the error bodies reach their clients
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        set_threads(ns.threads)
        eargs = engine_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=ns.log_level.upper() if ns.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ns.ray:
        from morserve.serving.ray_app import serve_forever     # the optional `ray` extra
        return serve_forever(ns)
    failure: list[BaseException] = []
    server: DrainingServer | None = None

    def on_load_failure(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    app = create_app(server_settings(ns), lambda: AsyncLLMEngine.from_args(eargs), on_load_failure)
    config = uvicorn_config(app, host=ns.host, port=ns.port, log_level=ns.log_level,
                            timeout_graceful_shutdown=2, access_log=ns.log_level in ("debug", "trace"))
    server = DrainingServer(config, app.state.server, ns.shutdown_timeout)
    server.run()
    return 1 if failure else 0
