"""Server-sent events, shared by completions and chat: `data: {json}\\n\\n` delta chunks (every
chunk with the request's one `created` time), a last chunk with `choices: []` and `usage` when
asked for, an error after the stream began as `data: {"error": {...}}`, and always `data: [DONE]`
at the end. Leaving the stream early (client gone) closes the Generation, which aborts its engine
requests."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from morserve.api.errors import APIError, error_body

if TYPE_CHECKING:
    from morserve.api.extras import ResponseExtras
    from morserve.api.generation import Generation, ResponseFormatter

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


async def stream_chunks(gen: Generation, formatter: ResponseFormatter, include_usage: bool,
                        continuous_usage: bool, extras: ResponseExtras | None = None) -> AsyncIterator[BaseModel]:
    """The response objects of one streamed request, in order."""
    try:
        for chunk in formatter.stream_prefix():
            yield gen.stamp(chunk)
        async for delta in gen.deltas():
            chunk = formatter.stream_chunk(delta)
            if extras is not None:
                extras.chunk(chunk, delta)
            if continuous_usage:
                chunk.usage = gen.usage()
            yield gen.stamp(chunk)
        if include_usage:
            yield gen.stamp(formatter.usage_chunk(gen.usage()))
    finally:
        await gen.close()


def _event(payload: str) -> str:
    return f"data: {payload}\n\n"


async def _encode(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield _event(chunk.model_dump_json())
    except APIError as exc:
        yield _event(json.dumps(error_body(exc.status, exc.message, exc.param).model_dump()))
    except Exception as exc:       # a bug: the client still gets a well-formed end of stream
        logger.exception("error while streaming", exc_info=exc)
        yield _event(json.dumps(error_body(500, f"internal error: {type(exc).__name__}").model_dump()))
    yield DONE


def sse_response(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    return StreamingResponse(_encode(chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
