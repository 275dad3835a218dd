"""AsyncLLMEngine: the LLMEngine driven by its own thread, with asyncio streams per request.

The event loop never waits on a tick: requests and aborts are queued as commands that the engine
thread applies between ticks, and outputs travel back with `call_soon_threadsafe`. A stream that
is closed early (client gone, task cancelled) aborts its request, which frees its KV pages before
the next tick. A request the engine refuses gets its ValueError; one that fails inside the engine
(while being added or sampled) gets a RequestFailedError, and every other request goes on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Callable

from morserve.engine.args import EngineArgs
from morserve.engine.llm_engine import LLMEngine, TickStats
from morserve.engine.input_checks import EngineLimits
from morserve.engine.outputs import RequestOutput
from morserve.engine.request_failures import RequestFailedError
from morserve.engine.sampling_params import SamplingParams
from morserve.engine.structured import StructuredOutputsParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can be served any more."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="morserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, args: EngineArgs) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_args(args))

    # ---- what the server reads ----------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def limits(self) -> EngineLimits:
        return self.engine.limits

    @property
    def last_tick(self) -> TickStats:
        return self.engine.last_tick

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def add_tick_listener(self, fn: Callable[[TickStats], None]) -> None:
        """Call `fn` in the engine thread after every tick and after every abort (whose zero-work
        stats carry the load left, so gauges fed from here never keep an aborted request's)."""
        self.engine.tick_listeners.append(fn)

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs after every new token; the last one has finished=True. Invalid
        input raises ValueError before anything is yielded."""
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error!r}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", request_id, prompt, params))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))
                self._wakeup.set()

    async def check_structured(self, spec: StructuredOutputsParams) -> None:
        """Compile a structured-output constraint in a worker thread (ValueError if it is invalid);
        the compiler caches it for the request that follows."""
        if self.engine.structured is None:
            raise ValueError("structured outputs need the model's tokenizer; this model has none")
        await asyncio.to_thread(self.engine.structured.compile, spec)

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)

    # ---- the engine thread ---------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:        # the loop is closed: nobody is listening any more
            self._streams.pop(request_id, None)

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                if rid not in self._streams:
                    continue                    # cancelled before it was added
                try:
                    self.engine.add_request(rid, prompt, params)
                except ValueError as exc:
                    self._deliver(rid, exc)
                except Exception as exc:       # noqa: BLE001 - this request's failure alone
                    logger.exception("adding request %s failed", rid)
                    self._deliver(rid, RequestFailedError(f"request failed: {type(exc).__name__}: {exc}"))
            else:
                self.engine.abort_request(cmd[1])

    def _run(self) -> None:
        while not self._stopped:
            try:
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out if out.error is None else RequestFailedError(out.error))
            except Exception as exc:   # a bug, not bad input: fail every stream, keep nothing
                logger.exception("engine step failed")
                self.error = exc
                for rid in list(self._streams):
                    self._deliver(rid, EngineDeadError(f"engine failed: {exc!r}"))
                    self.engine.abort_request(rid)
                return
