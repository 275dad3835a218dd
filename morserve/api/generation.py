"""One API request's run through the engine, shared by completions and chat.

Each prompt is one engine request (with n sequences); their output streams are merged. The
`Generation` turns cumulative engine outputs into per-choice deltas (choice index =
prompt_idx * n + i) for streaming, holding back the tail that could still turn out to be the start
of a stop string, and computes usage. Closing it (client gone, error, normal end) cancels every
engine stream still open, which aborts its request and frees its KV blocks at once. The admission
ticket is released when the last engine stream has ended, however that happens. `abort(error)`
(the drain timing out) ends the request with that error, which its client receives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from morserve.api.errors import APIError, error_responses
from morserve.api.extras import ResponseExtras
from morserve.api.metrics import ServerMetrics
from morserve.api.prompts import EnginePrompt
from morserve.api.protocol import StreamOptions, UsageInfo, now
from morserve.api.state import Admission, ServerState
from morserve.api.streaming import sse_response, stream_chunks
from morserve.engine import (
    AsyncLLMEngine,
    CompletionOutput,
    EngineDeadError,
    RequestFailedError,
    RequestOutput,
    SamplingParams,
)

logger = logging.getLogger(__name__)

GENERATION_RESPONSES = {
    200: {"description": "A JSON body, or with `stream: true` server-sent events (`data: {chunk}` ... "
                         "`data: [DONE]`)", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 404, 429, 500, 503)}


@dataclass
class ChoiceDelta:
    """What is new in one choice since the last delta: `text`, and tokens from `start` on."""

    index: int
    prompt_idx: int
    output: RequestOutput
    completion: CompletionOutput
    text: str
    start: int
    finish_reason: str | None
    stop_reason: int | str | None


class ResponseFormatter(Protocol):
    """Turns engine results into one endpoint's response objects."""

    def stream_prefix(self) -> list[BaseModel]: ...

    def stream_chunk(self, delta: ChoiceDelta) -> BaseModel: ...

    def usage_chunk(self, usage: UsageInfo) -> BaseModel: ...

    def response(self, outputs: list[RequestOutput], usage: UsageInfo) -> BaseModel: ...


@dataclass
class _Progress:
    sent_text: int = 0
    sent_tokens: int = 0
    done: bool = False


class ChoiceTracker:
    """What each choice has been sent so far; turns cumulative outputs into deltas. While a choice
    runs, the last len(longest stop string) - 1 characters are held back: they may still become
    the start of a stop string, which the final text leaves out."""

    def __init__(self, num_prompts: int, params: SamplingParams) -> None:
        self.n = params.n
        self._progress = [_Progress() for _ in range(num_prompts * params.n)]
        stops = params.stop if not params.include_stop_str_in_output else []
        self._holdback = max((len(s) for s in stops), default=1) - 1

    def delta(self, prompt_idx: int, out: RequestOutput, comp: CompletionOutput) -> ChoiceDelta | None:
        index = prompt_idx * self.n + comp.index
        progress = self._progress[index]
        if progress.done:
            return None
        final = comp.finish_reason is not None
        safe = len(comp.text) if final else len(comp.text) - self._holdback
        text = comp.text[progress.sent_text:safe] if safe > progress.sent_text else ""
        start = progress.sent_tokens
        if not text and len(comp.token_ids) == start and not final:
            return None
        progress.sent_text += len(text)
        progress.sent_tokens = len(comp.token_ids)
        progress.done = final
        return ChoiceDelta(index, prompt_idx, out, comp, text, start, comp.finish_reason if final else None,
                           comp.stop_reason if final else None)


class Generation:
    """The engine requests of one API request (see the module docstring)."""

    _END = object()            # queue marker: this prompt's engine stream has ended

    def __init__(self, engine: AsyncLLMEngine, prompts: list[EnginePrompt], params: SamplingParams,
                 request_id: str, metrics: ServerMetrics, admission: Admission) -> None:
        self.engine, self.prompts, self.params = engine, prompts, params
        self.request_id, self.metrics, self.admission = request_id, metrics, admission
        self.created = now()               # one `created` for the response and every chunk
        self.latest: list[RequestOutput | None] = [None] * len(prompts)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._open = len(prompts)
        self._peeked: tuple[int, RequestOutput] | None = None
        self._tracker = ChoiceTracker(len(prompts), params)
        admission.on_abort = self.abort
        for idx, prompt in enumerate(prompts):
            task = asyncio.ensure_future(self._pump(idx, prompt))
            task.add_done_callback(self._stream_ended)
            self._tasks.append(task)

    # ---- engine streams --------------------------------------------------------------------
    def _stream_ended(self, _: asyncio.Task) -> None:
        if all(t.done() for t in self._tasks):
            self.admission.release()

    async def _pump(self, idx: int, prompt: EnginePrompt) -> None:
        timer = self.metrics.request_timer(self.params)
        accepted = True
        try:
            async for out in self.engine.generate(prompt.token_ids, self.params, f"{self.request_id}-{idx}"):
                timer.on_output(out)
                self._queue.put_nowait((idx, out))
            self._queue.put_nowait((idx, self._END))
        except ValueError as exc:          # rejected before it started
            accepted = False
            self._queue.put_nowait((idx, APIError(400, str(exc), getattr(exc, "param", None))))
        except (EngineDeadError, RequestFailedError) as exc:
            self._queue.put_nowait((idx, APIError(500, str(exc))))
        except Exception as exc:           # a bug: answer 500 rather than leave the request hanging
            logger.exception("engine stream failed", exc_info=exc)
            self._queue.put_nowait((idx, APIError(500, f"internal error: {type(exc).__name__}")))
        finally:
            if accepted:
                timer.done()

    async def start(self) -> None:
        """Wait for the first output, so that a request the engine rejects is still answered
        with a 400 before a stream starts."""
        async for item in self._events():
            self._peeked = item
            break

    def abort(self, error: APIError) -> None:
        """End now: every engine stream is cancelled, and the client's next read is `error`."""
        self._queue.put_nowait((-1, error))
        for task in self._tasks:
            task.cancel()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._open:
            idx, item = await self._queue.get()
            if item is self._END:
                self._open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                self.latest[idx] = item
                yield idx, item

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as they arrive, until every engine request ended."""
        if self._peeked is not None:
            first, self._peeked = self._peeked, None
            yield first
        async for item in self._events():
            yield item

    # ---- results ---------------------------------------------------------------------------
    async def final_outputs(self) -> list[RequestOutput]:
        async for _ in self.events():
            pass
        return [out for out in self.latest if out is not None]

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        async for idx, out in self.events():
            for comp in out.outputs:
                delta = self._tracker.delta(idx, out, comp)
                if delta is not None:
                    yield delta

    def stamp(self, response: BaseModel) -> BaseModel:
        response.created = self.created
        return response

    def usage(self) -> UsageInfo:
        prompt = sum(len(p.token_ids) for p in self.prompts)
        completion = sum(len(c.token_ids) for out in self.latest if out is not None for c in out.outputs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _client_gone(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


async def respond(raw: Request, state: ServerState, prompts: list[EnginePrompt], params: SamplingParams,
                  request_id: str, formatter: ResponseFormatter, stream: bool,
                  stream_options: StreamOptions | None, extras: ResponseExtras | None = None) -> Response:
    """Run the request and answer it: an SSE stream, or one JSON body (abandoned, and the engine
    requests aborted, when the client disconnects first); `extras` adds vLLM's extra fields."""
    engine = state.ready_engine()
    admission = state.admit(len(prompts) * params.n)
    gen = Generation(engine, prompts, params, request_id, state.metrics, admission)
    if stream:
        try:
            await gen.start()
        except BaseException:
            await gen.close()
            raise
        asked = stream_options or StreamOptions(include_usage=False)
        include_usage = state.settings.enable_force_include_usage or bool(asked.include_usage)
        continuous = include_usage and bool(asked.continuous_usage_stats)
        return sse_response(stream_chunks(gen, formatter, include_usage, continuous, extras))

    async def collect() -> BaseModel:
        try:
            outputs = await gen.final_outputs()
        finally:
            await gen.close()
        response = formatter.response(outputs, gen.usage())
        if extras is not None:
            extras.response(response, outputs)
        return gen.stamp(response)

    work = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_client_gone(raw))
    await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return Response(status_code=499)
    return JSONResponse(work.result().model_dump())
