"""Every error the API returns has one shape: `{"errors": [{"field": ..., "error": ...}]}`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lambdalake.query import QueryError

log = logging.getLogger("lambdalake.serving")
_HTTP_FIELDS = {404: "path", 405: "method"}


class ApiError(Exception):
    def __init__(
        self, status: int, field: str, error: str, headers: Mapping[str, str] | None = None
    ):
        super().__init__(f"{field}: {error}")
        self.status, self.field, self.error, self.headers = status, field, error, headers


def error_response(
    status: int, problems: list[tuple[str, str]], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = {"errors": [{"field": field, "error": error} for field, error in problems]}
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, [(exc.field, exc.error)], exc.headers)


async def _query_error(request: Request, exc: QueryError) -> JSONResponse:
    return error_response(400, [(exc.field, exc.rule)])


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(400, [(_field(e["loc"]), e["msg"]) for e in exc.errors()])


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    field = _HTTP_FIELDS.get(exc.status_code, "$")
    return error_response(exc.status_code, [(field, str(exc.detail))], exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("request failed", exc_info=exc, extra={"path": request.url.path})
    return error_response(500, [("$", "internal error; see the server log")])


def _field(loc: tuple[Any, ...]) -> str:
    """`("query", "limit")` -> `limit`; `("body", "sql")` -> `sql`; `("body", 12)` -> `body`."""
    named = [str(part) for part in loc[1:] if isinstance(part, str)]
    return ".".join(named) or str(loc[0])


# Starlette types a handler as taking any Exception; it passes each only its own class's
_Handler = Callable[[Request, Any], Awaitable[JSONResponse]]
_HANDLERS: dict[type[Exception], _Handler] = {
    ApiError: _api_error,
    QueryError: _query_error,
    RequestValidationError: _validation_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}


def install_error_handlers(app: FastAPI) -> None:
    for exception, handler in _HANDLERS.items():
        app.add_exception_handler(exception, handler)
