"""SQL statements in sandbox worker processes, so that no statement can starve the server.

Each worker is a Python process with a DuckDB database of its own: no file or network
access, no extensions, one thread, a memory limit, nothing spilled to disk, no server path
in its settings, configuration locked. The server sends it a statement and the view tables
the statement names (Arrow IPC), and gets back the answer's rows already encoded as JSON,
bounded in rows and bytes. The server kills a worker that runs past the statement's
wall-clock time (execution and encoding alike) or past its memory, and starts another.

There are as many workers as statements may run at once; past that, `SandboxBusy`. Each
worker has a thread of its own in the server, so statements never take the threads the
other endpoints need.

`python -m lambdalake.serving.sql_sandbox FD` is a worker, talking over the socket FD.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import queue
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from decimal import Decimal
from functools import singledispatch
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import duckdb
import orjson
import pyarrow as pa
from prometheus_client import CollectorRegistry, Counter, Gauge

from lambdalake.query import QueryError
from lambdalake.serving.pg_catalog import register_postgres_functions
from lambdalake.serving.pg_text import data_row
from lambdalake.serving.sketch_functions import register_sketch_functions
from lambdalake.settings import Settings

log = logging.getLogger("lambdalake.serving.sql")
T = TypeVar("T")
DuckDBConfig = dict[str, str | bool | int | float | list[str]]  # duckdb.connect's `config`
_FETCH_ROWS = 64
_OUT_OF_MEMORY = "Out of Memory Error"
_WATCH_SECONDS = 0.02  # how often the server checks a running worker's memory
_START_SECONDS = 60.0
_PATH = re.compile(r"""(?<![\w.:/~-])~?/[\w.~:*-]+(?:/[\w.~:*-]*)*""")


class SandboxBusy(Exception):
    """Every worker is running a statement."""


@dataclass(frozen=True)
class SandboxLimits:
    workers: int
    memory_mb: int
    timeout_seconds: float
    max_rows: int
    max_bytes: int

    @classmethod
    def of(cls, settings: Settings, max_rows: int) -> SandboxLimits:
        return cls(settings.sql_concurrency, settings.sql_memory_mb,
                   settings.sql_timeout_seconds, max_rows, settings.sql_max_bytes)

    @property
    def memory_rule(self) -> str:
        return f"used more than the {self.memory_mb} MB of memory a statement may use"

    @property
    def timeout_rule(self) -> str:
        return (f"took longer than {self.timeout_seconds:g} s (running the statement and "
                "encoding its answer)")


@dataclass(frozen=True)
class EncodedRows:
    columns: list[str]
    types: list[str]  # DuckDB's type names
    rows: bytes  # a JSON array of row arrays, or DataRow messages (RowFormat)
    row_count: int
    truncated: bool


@dataclass(frozen=True)
class RowFormat:
    """How an answer's rows are encoded: each row, and the bytes around and between them."""

    name: str
    row: Callable[[tuple], bytes]
    opening: bytes
    separator: bytes
    closing: bytes


class SqlSandbox:
    """A pool of sandbox workers, started when first needed, one statement each at a time."""

    def __init__(self, limits: SandboxLimits, registry: CollectorRegistry):
        self.limits = limits
        killed = Counter("lambdalake_serving_sql_workers_killed", "SQL sandbox workers killed "
                         "past a statement's time or memory", ["reason"], registry=registry)
        self._idle: queue.SimpleQueue[Worker] = queue.SimpleQueue()
        for _ in range(limits.workers):
            self._idle.put(Worker(limits, killed))
        Gauge("lambdalake_serving_sql_statements_running", "SQL statements running now",
              registry=registry).set_function(lambda: limits.workers - self._idle.qsize())
        self._threads = ThreadPoolExecutor(limits.workers, thread_name_prefix="sql-sandbox")
        self._closed = False

    async def run(self, work: Callable[[Worker], T]) -> T:
        """`work(worker)` in a thread of the sandbox's own; SandboxBusy if no worker is free."""
        try:
            worker = self._idle.get_nowait()
        except queue.Empty:
            raise SandboxBusy(f"{self.limits.workers} statements are running already, "
                              "the most at once") from None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._use, worker, work)

    def _use(self, worker: Worker, work: Callable[[Worker], T]) -> T:
        try:
            return work(worker)
        finally:  # here, not in `run`: a cancelled request must not free a busy worker
            if self._closed:
                worker.stop()
            else:
                self._idle.put(worker)

    def close(self) -> None:
        """Stop the idle workers now, the busy ones when their statement ends."""
        self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                self._idle.get_nowait().stop()
            except queue.Empty:
                return


class Worker:
    """One sandbox process and the server's end of its socket; (re)started when needed."""

    def __init__(self, limits: SandboxLimits, killed: Counter):
        self.limits, self._killed = limits, killed
        self._process: subprocess.Popen | None = None
        self._connection: Connection | None = None

    def run(
        self, sql: str, tables: Mapping[str, pa.Table], *, params: Sequence[Any] = (),
        row_format: str = "json", describe: bool = False,
    ) -> EncodedRows:
        """The statement's answer (its rows in the named RowFormat), or QueryError naming the
        rule it broke. `params` fill the statement's `$1`, `$2`, ...; `describe`: its columns
        and types only, the statement not run."""
        connection = self._started()
        request = {"sql": sql, "tables": list(tables), "params": list(params),
                   "format": row_format, "describe": describe}
        try:
            connection.send_bytes(orjson.dumps(request, default=str))
            for table in tables.values():
                connection.send_bytes(_ipc(table))
            self._wait_for_answer(connection)
            reply = connection.recv_bytes(self.limits.max_bytes + 2**20)
        except (EOFError, OSError):
            self.stop()
            raise QueryError("sql", "stopped its sandbox process before answering") from None
        header, rows = reply.split(b"\n", 1)
        answer = orjson.loads(header)
        if "error" in answer:
            raise QueryError("sql", answer["error"])
        return EncodedRows(answer["columns"], answer["types"], rows, answer["rows"],
                           answer["truncated"])

    def _wait_for_answer(self, connection: Connection) -> None:
        deadline = time.monotonic() + self.limits.timeout_seconds
        while not connection.poll(_WATCH_SECONDS):
            if time.monotonic() > deadline:
                self._kill("timeout")
                raise QueryError("sql", self.limits.timeout_rule)
            if self._memory_mb() > self.limits.memory_mb:
                self._kill("memory")
                raise QueryError("sql", self.limits.memory_rule)

    def _memory_mb(self) -> float:
        """The worker's own memory (anonymous resident pages; shared libraries left out)."""
        assert self._process is not None
        try:
            with open(f"/proc/{self._process.pid}/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) / 1024
        except FileNotFoundError:  # it ended; the answer poll sees the end of its socket
            pass
        return 0.0

    def _started(self) -> Connection:
        if self._process is None or self._process.poll() is not None:
            self.stop()
            self._start()
        assert self._connection is not None
        return self._connection

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "lambdalake.serving.sql_sandbox", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], cwd="/", stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            self._connection = Connection(ours.detach())
        self._connection.send_bytes(orjson.dumps(asdict(self.limits)))
        try:
            ready = self._connection.poll(_START_SECONDS) and self._connection.recv_bytes()
        except (EOFError, OSError):  # it exited: its error is on stderr
            ready = False
        if ready != b"ready":
            self.stop()
            raise RuntimeError("the SQL sandbox process did not start")
        log.info("sql sandbox started", extra={"pid": self._process.pid})

    def _kill(self, reason: str) -> None:
        assert self._process is not None
        log.warning("sql sandbox killed", extra={"pid": self._process.pid, "reason": reason})
        self._killed.labels(reason).inc()
        self.stop()

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


# --- the worker process ---------------------------------------------------------------------


def serve(connection: Connection) -> None:
    """Answer statements until the server closes the socket."""
    os.nice(10)  # the server's own threads (ingestion, health) come first on a busy machine
    limits = SandboxLimits(**orjson.loads(connection.recv_bytes()))
    database, views = sandbox_database(limits.memory_mb), ViewTables()
    connection.send_bytes(b"ready")
    while True:
        try:
            request = orjson.loads(connection.recv_bytes())
            tables = {name: _table(connection.recv_bytes()) for name in request["tables"]}
        except EOFError:
            return
        connection.send_bytes(answer(database, request, tables, limits, views))


def sandbox_database(memory_mb: int) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with no way out: DuckDB gets half the worker's memory, the rest is
    for the interpreter, the statement's tables and its encoded answer."""
    config: DuckDBConfig = {
        "enable_external_access": False,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "memory_limit": f"{memory_mb // 2}MB",
        "threads": 1,
        "temp_directory": "",  # nothing spills to disk
        "home_directory": "/",  # and no server path shows in duckdb_settings()
    }
    database = duckdb.connect(config=config)
    register_sketch_functions(database)
    register_postgres_functions(database)
    database.execute("SET TimeZone = 'UTC'")
    database.execute("SET lock_configuration = true")
    return database


def answer(
    database: duckdb.DuckDBPyConnection, request: Mapping[str, Any],
    tables: Mapping[str, pa.Table], limits: SandboxLimits, views: ViewTables,
) -> bytes:
    """`{"columns", "types", "rows", "truncated"}` or `{"error": rule}`, a newline, the rows
    in the request's format."""
    cursor = database.cursor()
    filled: list[str] = []
    try:
        sql = request["sql"]
        _check_read_only(cursor, sql)
        views.fill(cursor, tables, filled)
        relation = cursor.sql(sql, params=request.get("params") or None)
        header: dict[str, Any] = {"columns": relation.columns,
                                  "types": [str(kind) for kind in relation.types]}
        if request.get("describe"):  # the answer's shape only: nothing runs
            return orjson.dumps(header | {"rows": 0, "truncated": False}) + b"\n"
        budget = limits.max_bytes - len(orjson.dumps(header)) - 64  # the count and flag
        row_format = ROW_FORMATS[request.get("format", "json")]
        rows, header["rows"], header["truncated"] = encode_rows(
            _rows(relation), limits.max_rows, budget, row_format)
        return orjson.dumps(header) + b"\n" + rows
    except QueryError as exc:
        return _error(exc.rule)
    except (duckdb.Error, pa.ArrowException, OSError) as exc:  # Arrow's, raised mid-stream
        if isinstance(exc, duckdb.OutOfMemoryException) or _OUT_OF_MEMORY in str(exc):
            return _error(limits.memory_rule)
        return _error(scrub_paths(str(exc)))
    finally:
        views.empty(cursor, filled)
        cursor.close()


class ViewTables:
    """Each view a table of the worker's database, created on its first statement and filled
    for each statement with the rows the server sent: tables, so that catalogs list them as
    tools expect (psql's `dt`), and lasting, so that their OIDs (the same in every worker,
    created in the same order) hold from one catalog query to the next (psql's `d view`)."""

    def __init__(self) -> None:
        self._created: set[str] = set()

    def fill(self, cursor: duckdb.DuckDBPyConnection, tables: Mapping[str, pa.Table],
             filled: list[str]) -> None:
        """Create and fill the tables; `filled` names those holding rows, to `empty` after."""
        for name, table in tables.items():
            if name in self._created and not table.num_rows:
                continue
            cursor.register("incoming", table)
            if name not in self._created:
                cursor.execute(f'CREATE TABLE "{name}" AS FROM incoming LIMIT 0')
                self._created.add(name)
            if table.num_rows:
                filled.append(name)
                cursor.execute(f'INSERT INTO "{name}" FROM incoming')
            cursor.unregister("incoming")

    @staticmethod
    def empty(cursor: duckdb.DuckDBPyConnection, filled: list[str]) -> None:
        for name in filled:
            cursor.execute(f'DELETE FROM "{name}"')


def _check_read_only(cursor: duckdb.DuckDBPyConnection, sql: str) -> None:
    statements = cursor.extract_statements(sql)
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise QueryError("sql", "must be one read-only statement: SELECT or WITH ... SELECT")


def _rows(relation: duckdb.DuckDBPyRelation) -> Iterator[tuple]:
    """Streamed in small Arrow batches: Python values for a few rows at a time."""
    for batch in relation.to_arrow_reader(_FETCH_ROWS):
        yield from zip(*(column.to_pylist() for column in batch.columns), strict=True)


def encode_rows(
    rows: Iterator[tuple], max_rows: int, max_bytes: int, row_format: RowFormat,
) -> tuple[bytes, int, bool]:
    """The rows encoded, up to max_rows rows and max_bytes bytes; how many; True if cut
    short."""
    encoded: list[bytes] = []
    size = len(row_format.opening) + len(row_format.closing)
    for row in rows:
        item = row_format.row(row)
        size += len(item) + (len(row_format.separator) if encoded else 0)
        if len(encoded) == max_rows or size > max_bytes:
            return _joined(encoded, row_format), len(encoded), True
        encoded.append(item)
    return _joined(encoded, row_format), len(encoded), False


def encode_row(row: tuple) -> bytes:
    values = [jsonable(value) for value in row]
    try:
        return orjson.dumps(values, default=str)
    except orjson.JSONEncodeError:  # an integer past 64 bits, which the standard library writes
        return json.dumps(values, default=str, separators=(",", ":")).encode()


def _joined(items: list[bytes], row_format: RowFormat) -> bytes:
    return row_format.opening + row_format.separator.join(items) + row_format.closing


ROW_FORMATS = {
    "json": RowFormat("json", encode_row, b"[", b",", b"]"),
    "pg": RowFormat("pg", data_row, b"", b"", b""),  # PostgreSQL DataRow messages
}


def _error(rule: str) -> bytes:
    return orjson.dumps({"error": rule}) + b"\n"


def _table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def scrub_paths(text: str) -> str:
    """An error text without filesystem paths, the server's or any other."""
    return _PATH.sub("<path>", text)


@singledispatch
def jsonable(value: Any) -> Any:
    """An Arrow result value as JSON: timestamps in ISO 8601 UTC, intervals in seconds,
    bytes in base64, a MAP as [key, value] pairs, a DECIMAL as a string."""
    return value


@jsonable.register
def _(value: float) -> float | None:
    return value if math.isfinite(value) else None


@jsonable.register
def _(value: datetime) -> str:
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")


@jsonable.register(date)
@jsonable.register(time_of_day)
def _(value: date | time_of_day) -> str:
    return value.isoformat()


@jsonable.register
def _(value: pa.MonthDayNano) -> float:
    """An interval in seconds, a month counted as 30 days (as DuckDB converts to Python)."""
    return (value.months * 30 + value.days) * 86_400 + value.nanoseconds / 1e9


@jsonable.register
def _(value: Decimal) -> int | str:
    """A DECIMAL with a scale as a string with exactly it (`"203.86"`): exact, as JSON
    numbers, read as binary floats by most clients, are not. Scale 0 (a HUGEINT sum of
    integers comes through Arrow as decimal(38,0)) is an integer."""
    exponent = value.as_tuple().exponent
    return int(value) if exponent == 0 else format(value, "f")


@jsonable.register
def _(value: bytes) -> str:
    return base64.b64encode(value).decode()


@jsonable.register(list)
@jsonable.register(tuple)
def _(value: list | tuple) -> list:
    return [jsonable(item) for item in value]


@jsonable.register
def _(value: dict) -> dict:
    return {str(key): jsonable(item) for key, item in value.items()}


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
