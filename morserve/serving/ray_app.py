"""morserve on Ray Serve: replicas (Ray actors) that each hold one AsyncLLMEngine and serve the
one FastAPI app of morserve.api.server (same routes, streaming included) behind Ray's HTTP proxy.

Three entry points, one parser (morserve.api.server's flags plus morserve.serving.ray_flags):
- `morserve serve --ray --num-replicas 2 ...` (`main`): joins or starts a Ray cluster, runs the
  application on `--host/--port`, blocks until SIGTERM/SIGINT, then shuts Serve down (Ray lets
  each replica finish its ongoing requests for up to --shutdown-timeout seconds);
- `serve run morserve.serving.ray_app:build_app model=... num_replicas=2` and KubeRay's RayService
  (`import_path: morserve.serving.ray_app:build_app`, `args:`): `build_app(args)` maps each
  `key: value` to the flag `--key value` (true for a bare switch);
- `application(ns)` for Python callers (tests, benchmarks).

Each replica tags its responses with `x-morserve-replica` (its Ray replica id, the name of its
actor in the `serve` namespace) and serves its own Prometheus registry, per-depth gauges included,
on `--replica-metrics-port` + its local rank on the node. Ray's health check calls the replica's
`check_health`, which fails once the engine has failed, so Ray replaces that replica.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from typing import Any

import ray
import torch
from fastapi import FastAPI
from prometheus_client import start_http_server
from ray import serve
from ray.serve.config import HTTPOptions
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from morserve.api.middleware import REQUEST_ID
from morserve.api.server import build_parser, create_app, engine_args, server_settings
from morserve.engine import AsyncLLMEngine
from morserve.serving.ray_flags import check_ray_arguments, deployment_options

logger = logging.getLogger("morserve.serving")

APP_NAME = "morserve"
REPLICA_HEADER = b"x-morserve-replica"


class ReplicaHeaders:
    """ASGI middleware: every HTTP response names the replica that made it. Ray's proxy already
    echoes `x-request-id` (the client's, or one it made up: the one the app saw), so the app's copy
    is dropped rather than sent twice."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID]
                message["headers"] = [*headers, (REPLICA_HEADER, self.replica)]
            await send(message)

        await self.app(scope, receive, tagged)


@serve.deployment(name="MorServe")
@serve.ingress()
class MorServeReplica:
    """One engine per replica; the ASGI app is built once the engine is loaded."""

    async def __init__(self, ns: argparse.Namespace) -> None:
        torch.set_num_threads(ns.threads_per_replica)
        eargs = engine_args(ns)
        if eargs.device is None and not ray.get_gpu_ids():
            eargs.device = "cpu"            # no GPU reserved for this replica: never take one
        self.ns = ns
        self.engine = await asyncio.to_thread(AsyncLLMEngine.from_args, eargs)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.to_full_id_str()
        self.local_rank = context.rank.local_rank
        logger.info("replica %s (local rank %d) loaded %s", self.replica_id, self.local_rank, ns.model)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(server_settings(self.ns), lambda: self.engine)
        if self.ns.replica_metrics_port:
            port = self.ns.replica_metrics_port + self.local_rank
            start_http_server(port, addr=self.ns.host, registry=app.state.server.metrics.registry)
            logger.info("replica %s: Prometheus /metrics on %s:%d", self.replica_id, self.ns.host, port)
        app.add_middleware(ReplicaHeaders, replica=self.replica_id)
        self.state = app.state.server
        return app

    async def check_health(self) -> None:
        """Ray's health check: wait out the few ms until the app has taken the engine; raise once
        loading or the engine failed (Ray then replaces the replica)."""
        for _ in range(100):
            phase = self.state.phase
            if phase == "ready":
                return
            if phase == "failed":
                raise RuntimeError(f"morserve engine failed: {self.state.load_error or self.engine.error!r}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"morserve replica still {self.state.phase}")


def parse_checked(argv: list[str]) -> argparse.Namespace:
    """morserve serve's flags (the parser carries the Ray ones); argparse's error (SystemExit) for
    a bad engine or Ray value."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        engine_args(ns)
        check_ray_arguments(ns)
    except ValueError as exc:
        parser.error(str(exc))
    return ns


def application(ns: argparse.Namespace, cluster_gpus: float | None = None) -> serve.Application:
    """The Serve application for these flags (GPUs per replica decided from the cluster's GPUs)."""
    if cluster_gpus is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    return MorServeReplica.options(**deployment_options(ns, cluster_gpus)).bind(ns)


def builder_argv(args: dict[str, Any]) -> list[str]:
    """`serve run` / RayService args -> flags: {"num_replicas": 2, "enforce_eager": true} ->
    ["--num-replicas", "2", "--enforce-eager"]; a list value gives the flag several values."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True or (isinstance(value, str) and value.lower() == "true"):
            argv.append(flag)
        elif value is False or (isinstance(value, str) and value.lower() == "false"):
            continue
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` and KubeRay's RayService."""
    return application(parse_checked(builder_argv(args)))


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def serve_forever(ns: argparse.Namespace) -> int:
    """`morserve serve --ray`: run the application on --host/--port until a signal."""
    try:
        check_ray_arguments(ns)
    except ValueError as exc:
        raise SystemExit(f"morserve serve: error: {exc}") from None
    ray.init(address=ns.ray_address, ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options=HTTPOptions(host=ns.host, port=ns.port))
    serve.run(application(ns), name=APP_NAME, route_prefix="/")
    logger.info("Ray Serve: %s on http://%s:%d", APP_NAME, ns.host, ns.port)
    try:
        _wait_for_signal()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
