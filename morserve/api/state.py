"""What the routes share: settings, the engine once loaded, metrics, and admission control.

Lifecycle: `loading` (the engine is built in a thread; /health 503) -> `ready` -> `draining`
(after SIGTERM: /health 503, new generation requests 503, running ones finish) or `failed`.
Admission counts engine sequences (prompts x n) in flight: up to `max_num_seqs` run, at most
`max_num_queued_reqs` more may wait; a request that would not fit now gets 429 + Retry-After, one
that could never fit a 400. When the drain times out, `abort_all` ends every admitted request
with an error its client receives (a JSON error body, or a stream's final error event).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from morserve.api.errors import APIError
from morserve.api.metrics import ServerMetrics
from morserve.engine import AsyncLLMEngine


@dataclass
class ServerSettings:
    model: str
    served_model_names: list[str]
    max_num_seqs: int = 64
    max_num_queued_reqs: int | None = 1024
    api_key: str | None = None
    enable_force_include_usage: bool = False
    vllm_metric_names: bool = False
    retry_after_s: int = 1
    max_request_body_bytes: int = 16 << 20
    header_read_timeout: float = 10.0
    body_read_timeout: float = 30.0
    keep_alive_timeout: float = 5.0

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: ServerMetrics
    engine: AsyncLLMEngine | None = None
    load_error: BaseException | None = None
    draining: bool = False
    in_flight_seqs: int = 0
    in_flight_requests: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _admitted: set[Admission] = field(default_factory=set)

    @property
    def phase(self) -> str:
        if self.load_error is not None or (self.engine is not None and self.engine.error is not None):
            return "failed"
        if self.engine is None:
            return "loading"
        return "draining" if self.draining else "ready"

    def ready_engine(self) -> AsyncLLMEngine:
        """The engine, or a 503 that says why there is none to use."""
        phase = self.phase
        if phase == "ready":
            return self.engine
        reasons = {"loading": "the model is still loading", "draining": "the server is shutting down",
                   "failed": "the engine failed; see the server log"}
        raise APIError(503, reasons[phase])

    def check_model(self, requested: str | None) -> str:
        """The model name to answer with; 404 for a model this server does not serve."""
        names = self.settings.served_model_names
        if requested is None or requested in names:
            return requested or names[0]
        raise APIError(404, f"The model `{requested}` does not exist.", param="model")

    def admit(self, num_seqs: int) -> Admission:
        limit = self.settings.max_num_queued_reqs
        if limit is not None:
            capacity = self.settings.max_num_seqs + limit
            if num_seqs > capacity:
                raise APIError(400, f"this request needs {num_seqs} sequences (prompts x n); the server "
                                    f"admits at most {capacity} at once", param="n")
            if self.in_flight_seqs + num_seqs > capacity:
                raise APIError(429, f"the server is busy ({self.in_flight_seqs} sequences in flight, queue "
                                    f"limit {limit}); retry later",
                               headers={"Retry-After": str(self.settings.retry_after_s)})
        self.in_flight_seqs += num_seqs
        self.in_flight_requests += 1
        self._idle.clear()
        admission = Admission(self, num_seqs)
        self._admitted.add(admission)
        return admission

    def abort_all(self, error: APIError) -> int:
        """End every admitted request now with `error` (its client receives it); returns how many."""
        admitted = [a for a in self._admitted if a.on_abort is not None]
        for admission in admitted:
            admission.on_abort(error)
        return len(admitted)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no admitted request is in flight; False on timeout."""
        if self.in_flight_requests == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def _release(self, admission: Admission) -> None:
        self._admitted.discard(admission)
        num_seqs = admission.num_seqs
        self.in_flight_seqs -= num_seqs
        self.in_flight_requests -= 1
        if self.in_flight_requests == 0:
            self._idle.set()


def get_state(request: Request) -> ServerState:
    return request.app.state.server


class Admission:
    """One admitted request's share of the in-flight count; release() is idempotent. `on_abort`
    (set by whoever runs the request) ends the request with an error, for `abort_all`."""

    def __init__(self, state: ServerState, num_seqs: int) -> None:
        self.state, self.num_seqs, self.released = state, num_seqs, False
        self.on_abort: Callable[[APIError], None] | None = None

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state._release(self)
