"""Connection limits, so that slow or oversized clients cost a bounded amount of time and memory:

- `BodyLimitMiddleware` (ASGI) reads each request body before the app sees it: more than
  `max_bytes` is a 413 (at once when Content-Length says so, without reading it), a body not
  complete within `timeout` seconds of the request's headers a 408; both close the connection.
- `header_timeout_protocol` wraps uvicorn's HTTP protocol: a connection whose next request's
  headers are not complete within `timeout` seconds (of it opening, or of the previous response
  ending) is closed. Idle keep-alive connections are closed by uvicorn's `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from morserve.api.errors import error_response

CLOSE = {"Connection": "close"}


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    def _too_large(self) -> str:
        return f"the request body exceeds the server's limit of {self.max_bytes} bytes (--max-request-body-bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await error_response(413, self._too_large(), headers=CLOSE)(scope, receive, send)
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None when the request was answered here (413, 408) or the client left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                await error_response(408, f"the request body did not arrive within {self.timeout:g} s "
                                          f"(--body-read-timeout)", headers=CLOSE)(scope, receive, send)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await error_response(413, self._too_large(), headers=CLOSE)(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def header_timeout_protocol(timeout: float, base: type = AutoHTTPProtocol) -> type:
    """uvicorn's HTTP protocol class `base`, closing connections whose request headers are late."""

    class HeaderTimeoutProtocol(base):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            if not self.transport.is_closing():
                self._header_timer = self.loop.call_later(timeout, self._headers_late, self.cycle)

        def _headers_late(self, cycle_when_armed) -> None:
            """No request began since the timer was armed, and none is being answered: close."""
            self._header_timer = None
            idle = self.cycle is cycle_when_armed and (cycle_when_armed is None or cycle_when_armed.response_complete)
            if idle and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
