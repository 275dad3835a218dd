"""Error bodies `{"error": {"message", "type", "param", "code"}}` and the handlers that turn every
failure into one: validation problems are 400 (as in vLLM, not FastAPI's 422), an unknown route 404,
and an unexpected exception a logged 500 that never leaks a traceback. The OpenAPI schema says so."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from morserve.api.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestTooLargeError", 429: "RateLimitError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error the client should see with this status (raised anywhere in a handler)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries for these error statuses (routes pass them to their decorator)."""
    return {status: {"model": ErrorResponse, "description": ERROR_TYPES[status]} for status in statuses}


def error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    err_type = ERROR_TYPES.get(status) or ("BadRequestError" if status < 500 else "InternalServerError")
    return ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=status))


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param).model_dump(), status_code=status, headers=headers)


def bad_request(exc: ValueError) -> APIError:
    return APIError(400, str(exc), param=getattr(exc, "param", None))


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, params = [], []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if loc:
            params.append(loc[0])
        where, msg = ".".join(loc) or "body", err.get("msg", "invalid")
        parts.append(msg if msg.startswith(where) else f"{where}: {msg}")
    return "; ".join(parts) or "invalid request", (params[0] if params else None)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return error_response(400, message, param)

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}")

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
    _document_400_not_422(app)


def _document_400_not_422(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for op in operations.values():
                    if op.get("responses", {}).pop("422", None) is not None:
                        op["responses"].setdefault("400", {"description": "Invalid request", "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
