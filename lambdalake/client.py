"""A Python client for lambdalake: send events to the gateway, query the serving API.

    from lambdalake.client import Client

    with Client("http://127.0.0.1:8080", key="...", api_url="http://127.0.0.1:8000") as lake:
        lake.send([{"type": "pageview", "url": "/home", "user_id": "u1"}])
        rows = lake.query("pageviews_by_url_hour", bucket="day", url=["/home", "/docs"])
        table = lake.query("pageviews_by_url_hour", as_="arrow")  # pyarrow.Table
        answer = lake.sql("SELECT url, sum(pageviews) FROM pageviews_by_url_hour GROUP BY url")

`send` batches events, gives each an `event_id` before its first attempt (so a retry is
counted once), and on 429 or 503 waits as Retry-After says before trying again. pyarrow and
pandas are imported only when an answer is asked for as a table or data frame.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import httpx

RETRYABLE = {429, 502, 503, 504}
ARROW = "application/vnd.apache.arrow.stream"


class LambdalakeError(Exception):
    """A request refused for good: the status and the API's `errors` (field and rule)."""

    def __init__(self, status: int, errors: list[dict[str, str]]):
        problems = "; ".join(f"{e.get('field')}: {e.get('error')}" for e in errors)
        super().__init__(f"HTTP {status}: {problems}")
        self.status, self.errors = status, errors


class Client:
    """`url`: the gateway (POST /events); `api_url`: the serving API (default `url`)."""

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        api_url: str | None = None,
        batch_size: int = 500,
        max_attempts: int = 8,
        max_wait_s: float = 30.0,
        timeout_s: float = 30.0,
        verify: Any = True,
    ):
        headers = {"X-API-Key": key} if key else {}
        self._ingest = httpx.Client(base_url=url, headers=headers, timeout=timeout_s,
                                    verify=verify)
        self._api = httpx.Client(base_url=api_url or url, headers=headers, timeout=timeout_s,
                                 verify=verify)
        self.batch_size, self.max_attempts, self.max_wait_s = batch_size, max_attempts, max_wait_s

    def send(self, events: Iterable[Mapping[str, Any]]) -> int:
        """Send events in batches; the number accepted. An event without `event_id` gets one
        first, kept through every retry. Raises LambdalakeError on a refused batch (400)."""
        accepted, batch = 0, []
        for event in events:
            batch.append({"event_id": uuid.uuid4().hex, **event})
            if len(batch) == self.batch_size:
                accepted += self._send_batch(batch)
                batch = []
        return accepted + (self._send_batch(batch) if batch else 0)

    def _send_batch(self, batch: list[dict[str, Any]]) -> int:
        reply = self._request(self._ingest, "POST", "/events", json={"events": batch})
        return int(reply.json().get("accepted", len(batch)))

    def query(
        self,
        view: str,
        *,
        as_: Literal["rows", "arrow", "pandas"] = "rows",
        **params: str | int | bool | Sequence[str] | None,
    ) -> Any:
        """A view's merged answer, every page of it: rows (dicts), a pyarrow Table or a pandas
        DataFrame. Parameters as the API takes them (`from_` for `from`, `url_prefix` for
        `url.prefix`); a list filters a dimension by any of its values."""
        query = _query_params(params)
        if as_ != "rows":
            reply = self._request(self._api, "GET", f"/views/{view}",
                                  params=[*query, ("format", "arrow")])
            import pyarrow as pa

            table = pa.ipc.open_stream(reply.content).read_all()
            return table.to_pandas() if as_ == "pandas" else table
        rows: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            paged = query + ([("cursor", cursor)] if cursor else [])
            body = self._request(self._api, "GET", f"/views/{view}", params=paged).json()
            rows += body["rows"]
            cursor = body["next_cursor"]
            if cursor is None or params.get("limit") is not None:  # a limit: the top N only
                return rows

    def sql(self, statement: str) -> dict[str, Any]:
        """POST /sql: `columns`, `rows`, `truncated` and `freshness`."""
        return self._request(self._api, "POST", "/sql", json={"sql": statement}).json()

    def _request(self, http: httpx.Client, method: str, path: str, **kwargs: Any
                 ) -> httpx.Response:
        """The reply, after waiting out 429/503 (Retry-After) and transport errors."""
        for attempt in range(self.max_attempts):
            try:
                reply = http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt == self.max_attempts - 1:
                    raise
                time.sleep(min(self.max_wait_s, 0.1 * 2**attempt))
                continue
            if reply.status_code not in RETRYABLE or attempt == self.max_attempts - 1:
                break
            time.sleep(self._wait(reply, attempt))
        if reply.status_code >= 400:
            raise LambdalakeError(reply.status_code, _errors(reply))
        return reply

    def _wait(self, reply: httpx.Response, attempt: int) -> float:
        try:
            return min(self.max_wait_s, float(reply.headers["retry-after"]))
        except (KeyError, ValueError):
            return min(self.max_wait_s, 0.1 * 2**attempt)

    def close(self) -> None:
        self._ingest.close()
        self._api.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _query_params(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for name, value in params.items():
        if value is None:
            continue
        name = {"from_": "from"}.get(name, name)
        name = name[: -len("_prefix")] + ".prefix" if name.endswith("_prefix") else name
        values = value if isinstance(value, list | tuple) else [value]
        pairs += [(name, _text(v)) for v in values]
    return pairs


def _text(value: Any) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def _errors(reply: httpx.Response) -> list[dict[str, str]]:
    try:
        return list(reply.json()["errors"])
    except (ValueError, KeyError, TypeError):
        return [{"field": "$", "error": reply.text[:200]}]
