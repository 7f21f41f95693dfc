"""Bounds on the HTTP connections a uvicorn server holds, so that slow or half-sent requests
cannot take the process's file descriptors (which every other loop of it needs too).

uvicorn's `limit_concurrency` only counts requests whose headers arrived, and it has no
timeout for a request still arriving. `uvicorn_bounds` gives a server an h11 protocol class
that checks both at the connection, and an accept backlog sized to match:
- past `cap` open connections, a new one is answered 503 and closed as soon as it is
  accepted, so holding it costs no descriptor;
- a request whose headers and body have not all arrived within `read_timeout_s` of the
  connection opening (or of the previous response, on a kept-alive connection) is answered
  408 and closed.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import h11
from prometheus_client import Counter
from uvicorn.protocols.http.h11_impl import H11Protocol

DROPPED = Counter("lambdalake_http_connections_dropped", "Connections an HTTP server closed "
                  "unserved, by server and reason", ["server", "reason"])
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\n"
         b"content-length: 0\r\n\r\n")
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
_STILL_ARRIVING = (h11.IDLE, h11.SEND_BODY)  # the client's side of a request under way
_MAX_BACKLOG = 128


def uvicorn_bounds(server: str, max_connections: int, read_timeout_s: float) -> dict[str, Any]:
    """`uvicorn.Config` arguments bounding a server's connections (see the module's doc).

    asyncio accepts up to `backlog` connections in one go before any of them is closed, so
    a server can hold `cap + 2 * backlog` descriptors at a moment: both are sized to keep
    that within this server's share of the process's file limit (a quarter: the gateway
    and the API together hold at most half, the rest is for logs, stores and clients).
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    share = max_connections + 2 * _MAX_BACKLOG if soft == resource.RLIM_INFINITY else soft // 4
    backlog = max(1, min(_MAX_BACKLOG, share // 8))
    cap = max(1, min(max_connections, share - 2 * backlog))
    return {"http": bounded_h11(server, cap, read_timeout_s), "backlog": backlog}


def bounded_h11(server: str, cap: int, read_timeout_s: float) -> type[H11Protocol]:
    """An h11 protocol for uvicorn holding at most `cap` connections, each request read
    whole within `read_timeout_s`; `server` names it in metrics and logs."""

    class BoundedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= cap:
                self.transport = transport
                DROPPED.labels(server, "cap").inc()
                transport.write(_BUSY)
                transport.close()
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _read_timed_out(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state not in _STILL_ARRIVING:
                return  # closed, or the request arrived whole and is being answered
            DROPPED.labels(server, "read_timeout").inc()
            if self.conn.our_state is h11.IDLE:
                self.transport.write(_TIMED_OUT)
            self.transport.close()

    return BoundedH11
