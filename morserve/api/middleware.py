"""Pure ASGI middleware (streams and disconnects pass through untouched): the Bearer API key on
the API paths (/health, /metrics, /version stay open) and the `x-request-id` header echoed on
every response (one is made up when the client sent none)."""

from __future__ import annotations

import secrets
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from morserve.api.errors import error_response

PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize", "/tokenizer_info")
REQUEST_ID = b"x-request-id"


class RequestMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        self.app = app
        self.api_key = api_key

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(REQUEST_ID) or uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID, request_id)]
            await send(message)

        if self.api_key and scope["path"].startswith(PROTECTED_PREFIXES) and not self._authorized(headers):
            response = error_response(401, "invalid or missing API key (Authorization: Bearer ...)",
                                      headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)
