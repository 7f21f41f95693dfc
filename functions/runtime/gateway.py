"""The HTTP gateway: requests in as API Gateway HTTP API (payload format 2.0) events, out as HTTP.

Routes are the functions' `HttpApi` events (`METHOD /path`). As API Gateway does: a body over
the payload limit gets 413 before it is read whole, an unknown route 404, a throttled
function 429, a failed one 500, a timed-out one 504. Past `max_connections` open connections a
new one gets 503, and a request not read whole within `read_timeout_s` gets 408
(`lambdalake.connections`): slow or half-sent requests cannot exhaust the process.
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from lambdalake.connections import uvicorn_bounds
from lambdalake.functions.runtime.context import ACCOUNT
from lambdalake.functions.runtime.function import (
    FunctionError,
    FunctionTimeout,
    LocalFunction,
    Throttled,
)

if TYPE_CHECKING:  # the gateway itself needs no settings
    from lambdalake.settings import UvicornTls

log = logging.getLogger("lambdalake.functions.gateway")
PAYLOAD_LIMIT_BYTES = 5 * 1024 * 1024
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class PayloadTooLarge(Exception):
    pass


class Gateway:
    def __init__(self, functions: Iterable[LocalFunction], host: str, port: int,
                 payload_limit: int = PAYLOAD_LIMIT_BYTES, max_connections: int = 1000,
                 read_timeout_s: float = 10.0, tls: UvicornTls | None = None,
                 openapi: Mapping[str, Any] | None = None):
        """`tls`: uvicorn's `ssl_certfile` and `ssl_keyfile` to serve HTTPS (Settings.tls).
        `openapi`: the routes' OpenAPI document, served at /openapi.json with Swagger UI at
        /docs (`functions.runtime.openapi`)."""
        self.routes = {route.key: f for f in functions for route in f.spec.routes}
        self.host, self.port, self.payload_limit = host, port, payload_limit
        docs = [] if openapi is None else docs_routes(openapi)
        app = Starlette(routes=[*docs, Route("/{path:path}", self.handle, methods=METHODS)])
        self.scheme = "https" if tls else "http"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, **(tls or {}),
                                **uvicorn_bounds("gateway", max_connections, read_timeout_s))
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 10) -> None:
        """Listen (port 0: any free port) and serve from a background thread."""
        listener = tcp_listener(self.host, self.port)
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [listener]},
                                        name="gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start on {self.url}")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()

    async def handle(self, request: Request) -> Response:
        route_key = f"{request.method} {request.url.path}"
        function = self.routes.get(route_key)
        if function is None:
            return JSONResponse({"message": "Not Found"}, 404)
        try:
            body = await read_body(request, self.payload_limit)
        except PayloadTooLarge:
            return JSONResponse({"message": "Request Entity Too Large: body over "
                                            f"{self.payload_limit} bytes"}, 413)
        except ClientDisconnect:  # gone, or closed for a body too slow: no one to answer
            return Response(status_code=400)
        try:
            result = await run_in_threadpool(function.invoke, api_event(request, body, route_key))
        except Throttled:
            return JSONResponse({"message": "Too Many Requests"}, 429)
        except FunctionTimeout:
            return JSONResponse({"message": "Gateway Timeout"}, 504)
        except FunctionError as error:  # as API Gateway: the caller sees 500, the log says why
            log.error("function failed", exc_info=error.__cause__,
                      extra={"function": function.name, "route": route_key})
            return JSONResponse({"message": "Internal Server Error"}, 500)
        return http_response(result)


def tcp_listener(host: str, port: int) -> socket.socket:
    """An IPv4 listening socket of protocol TCP. asyncio sets TCP_NODELAY only on connections
    of that protocol (`socket.create_server` makes them of protocol 0): without it a
    response's body waits behind its headers for the client's delayed ACK, 40 ms a request."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen()
    except OSError:
        listener.close()
        raise
    return listener


_ASSETS = "/docs/assets"


def docs_routes(openapi: Mapping[str, Any]) -> list[BaseRoute]:
    """GET /openapi.json, and Swagger UI at /docs from the assets of `swagger-ui-bundle`."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    document = dict(openapi)

    def schema(request: Request) -> Response:
        return JSONResponse(document)

    def swagger(request: Request) -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{document['info']['title']} docs",
            swagger_js_url=f"{_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{_ASSETS}/favicon-32x32.png")

    return [Route("/openapi.json", schema, methods=["GET"]),
            Route("/docs", swagger, methods=["GET"]),
            Mount(_ASSETS, StaticFiles(directory=str(swagger_ui_path)))]


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def api_event(request: Request, body: bytes, route_key: str) -> dict[str, Any]:
    """The API Gateway HTTP API (2.0) event of a request."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():  # lower-cased; repeats joined by commas
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    try:
        text, encoded = body.decode(), False
    except UnicodeDecodeError:
        text, encoded = base64.b64encode(body).decode(), True
    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": request.url.path,
        "rawQueryString": request.url.query,
        "headers": headers,
        "requestContext": {
            "accountId": ACCOUNT,
            "apiId": "local",
            "domainName": headers.get("host", ""),
            "http": {
                "method": request.method,
                "path": request.url.path,
                "protocol": f"HTTP/{request.scope.get('http_version', '1.1')}",
                "sourceIp": request.client.host if request.client else "",
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": route_key,
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": encoded,
    }
    if request.query_params:
        event["queryStringParameters"] = {
            k: ",".join(request.query_params.getlist(k)) for k in request.query_params
        }
    if body:
        event["body"] = text
    return event


def http_response(result: Any) -> Response:
    """The HTTP response of a handler's result: a response object, or a JSON body for 200."""
    if not (isinstance(result, dict) and "statusCode" in result):
        return JSONResponse(result)
    body = result.get("body") or ""
    content = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
    return Response(content, result["statusCode"], headers=result.get("headers"))
