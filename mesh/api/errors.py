"""Every error the API answers is JSON: {"error": "<short reason>", "detail": "<what is wrong>"}.

Route code raises `ApiError`; FastAPI's own errors (unknown route, wrong method, request
validation) are turned into the same shape here. A request that reaches the catch-all
handler is a bug: it is logged with its traceback and answered 500 in the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("sluice.api")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        error: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error or _reason(status)
        self.detail = detail
        self.headers = headers
        self.extra = extra


def error_response(
    status: int,
    error: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **extra}, status, headers=headers)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


def describe(errors: Sequence[Any]) -> str:
    """FastAPI's validation errors as one line: 'body.events: Field required; ...'."""
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.error, exc.detail, exc.headers, **exc.extra)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = "no such route; see /v1/openapi.json"
    return error_response(
        exc.status_code, _reason(exc.status_code), detail, dict(exc.headers or {})
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    for e in errors:
        if e.get("type") == "json_invalid":
            why = e.get("ctx", {}).get("error", "JSON decode error")
            at = e.get("loc", ("body", 0))[-1]
            detail = f"body is not valid JSON: {why} (at character {at})"
            return error_response(400, "malformed request", detail)
        if tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), bytes):
            detail = "expected a JSON object body with Content-Type: application/json"
            return error_response(400, "malformed request", detail)
    return error_response(422, "invalid request", describe(errors))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error", f"{type(exc).__name__}; see the server log")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
