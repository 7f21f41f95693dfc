"""The PostgreSQL wire protocol endpoint: psql, psycopg, Grafana, Superset, Metabase and any
other PostgreSQL client query the views as they would a read-only PostgreSQL database.

pygwire encodes and decodes the protocol's messages (sans-I/O); this module is the server:
an asyncio loop in a thread of its own, one session per connection. Statements run as
POST /sql runs them, in the same sandbox workers under the same limits; answers travel in
PostgreSQL's text format, encoded by the worker. What a session asks of a server beyond
reading (SET, BEGIN, COMMIT, SHOW of a setting, DISCARD) it is answered here, and changes
nothing. A session's errors end its statement, or its own connection when the protocol
itself is broken; never another's.

Authentication: any user name, an API key with the `query` scope as the password, in a
cleartext password exchange. With a certificate configured (`tls_certfile`, `tls_keyfile`,
as for the API) a client's SSLRequest is answered 'S' and the connection wrapped in TLS
before the startup (`sslmode=require`); without one it is answered 'N'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import ssl
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pygwire import ConnectionPhase, FrontendMessageDecoder, PygwireError
from pygwire.constants import TransactionStatus
from pygwire.messages import (
    AuthenticationCleartextPassword,
    AuthenticationOk,
    BackendKeyData,
    BackendMessage,
    Bind,
    BindComplete,
    CancelRequest,
    Close,
    CloseComplete,
    CommandComplete,
    Describe,
    EmptyQueryResponse,
    ErrorResponse,
    Execute,
    FieldDescription,
    Flush,
    GSSEncRequest,
    NoData,
    NoticeResponse,
    ParameterDescription,
    ParameterStatus,
    Parse,
    ParseComplete,
    PasswordMessage,
    PGMessage,
    Query,
    ReadyForQuery,
    RowDescription,
    SSLRequest,
    StartupMessage,
    Sync,
    Terminate,
)

from lambdalake.auth import AuthError, Keyring
from lambdalake.loops import Loop, Loops
from lambdalake.query import QueryError
from lambdalake.serving.app import Serving, restoring_problem
from lambdalake.serving.pg_catalog import SERVER_VERSION, postgres_spelling
from lambdalake.serving.pg_text import TEXT_OID, data_row, type_oid
from lambdalake.serving.query import run_sql
from lambdalake.serving.sql_sandbox import EncodedRows, SandboxBusy
from lambdalake.settings import UvicornTls

log = logging.getLogger("lambdalake.serving.pgwire")
_READ_BYTES = 65_536
_MAX_MESSAGE_BYTES = 4 * 2**20  # a statement and its parameters; past it the client is broken
_HEARTBEAT_SECONDS = 1.0
_POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
SETTINGS = {  # what SHOW answers, and the parameter statuses sent at startup
    "server_version": SERVER_VERSION, "server_encoding": "UTF8", "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY", "IntervalStyle": "postgres", "TimeZone": "UTC",
    "integer_datetimes": "on", "standard_conforming_strings": "on", "is_superuser": "off",
    "default_transaction_read_only": "on", "transaction_read_only": "on",
    "transaction_isolation": "read committed", "search_path": "main",
    "max_identifier_length": "63", "application_name": "",
}
_STARTUP_STATUSES = ("server_version", "server_encoding", "client_encoding", "DateStyle",
                     "IntervalStyle", "TimeZone", "integer_datetimes",
                     "standard_conforming_strings", "is_superuser")
_SHOWN = {name.lower(): name for name in SETTINGS}
_LEADING_NOISE = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)
_TRANSACTION_TAGS = {"begin": "BEGIN", "start": "BEGIN", "commit": "COMMIT", "end": "COMMIT",
                     "rollback": "ROLLBACK", "abort": "ROLLBACK"}
_IGNORED = {"set": "SET", "reset": "RESET", "discard": "DISCARD ALL",
            "deallocate": "DEALLOCATE", "unlisten": "UNLISTEN"}


class PgError(Exception):
    """An ErrorResponse: SQLSTATE code and message; FATAL ones end the connection."""

    def __init__(self, code: str, message: str, severity: str = "ERROR"):
        super().__init__(message)
        self.code, self.message, self.severity = code, message, severity

    def response(self) -> ErrorResponse:
        return ErrorResponse(fields={"S": self.severity, "V": self.severity, "C": self.code,
                                     "M": self.message})


@dataclass
class Answer:
    """One statement's outcome: columns (None: a command without rows) and its tag."""

    tag: str
    columns: list[str] | None = None
    types: list[str] = field(default_factory=list)
    rows: bytes = b""
    notice: str | None = None

    @classmethod
    def of(cls, rows: EncodedRows) -> Answer:
        notice = ("answer truncated: past the SQL row or byte bound (sql_max_bytes)"
                  if rows.truncated else None)
        return cls(f"SELECT {rows.row_count}", rows.columns, rows.types, rows.rows, notice)

    def description(self) -> BackendMessage:
        if self.columns is None:
            return NoData()
        return RowDescription(fields=[
            FieldDescription(name=name, type_oid=type_oid(kind), type_size=-1, type_modifier=-1)
            for name, kind in zip(self.columns, self.types, strict=True)])


@dataclass
class Portal:
    sql: str
    params: list[Any]
    answer: Answer | None = None  # run early by a Describe, sent by the Execute


class PgWireServer:
    """The endpoint of one serving process: `start(loops)` returns once it listens; its
    loop in `loops` beats while the event loop runs, so health sees it stuck or dead."""

    def __init__(self, serving: Serving, host: str, port: int):
        self.serving, self.host, self.requested_port = serving, host, port
        self.port = 0
        self._listening = threading.Event()
        self._loop: Loop | None = None
        self._asyncio_loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self.tls = _tls_context(serving.settings.tls)
        self._connections = serving.metrics.pg_connections
        self._statements = serving.metrics.pg_statements
        self._open = 0

    def start(self, loops: Loops, timeout: float = 30.0) -> PgWireServer:
        self._loop = loops.add(Loop("pgwire", self._serve_step, stuck_after_s=10.0,
                                    max_backoff_s=5.0))
        self._loop.start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self._loop.last_error or time.monotonic() > deadline:  # a port taken, say
                self.stop()
                raise RuntimeError(f"the PostgreSQL endpoint did not start on "
                                   f"{self.host}:{self.requested_port}: {self._loop.last_error}")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._loop.stopping.set()
        if self._asyncio_loop is not None and self._stopped is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                self._asyncio_loop.call_soon_threadsafe(self._stopped.set)
        self._loop.stop(timeout_s=10)

    def _serve_step(self) -> float:
        asyncio.run(self._serve())
        return 0.0

    async def _serve(self) -> None:
        assert self._loop is not None
        self._asyncio_loop, self._stopped = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._connection, self.host, self.requested_port,
                                            limit=_READ_BYTES)
        self.port = server.sockets[0].getsockname()[1]
        log.info("postgres endpoint listening", extra={"host": self.host, "port": self.port})
        self._listening.set()
        async with server:
            while not self._loop.stopping.is_set():
                self._loop.beat()  # the event loop turns: not stuck
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), _HEARTBEAT_SECONDS)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        limit = self.serving.settings.pg_max_connections
        self._open += 1
        self._connections.inc()
        session = Session(self, reader, writer)
        try:
            if self._open > limit:
                raise PgError("53300", f"too many connections: at most {limit} at once",
                              "FATAL")
            await session.run()
        except PgError as error:
            await session.send_now(error.response())
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # the server stops: the connection ends with it
            pass
        except Exception:  # a bug: this connection ends, the server and the others go on
            log.exception("postgres session failed")
            await session.send_now(PgError("XX000", "internal error", "FATAL").response())
        finally:
            self._open -= 1
            self._connections.dec()
            writer.close()

    def count(self, outcome: str) -> None:
        self._statements.labels(outcome).inc()


def _tls_context(tls: UvicornTls) -> ssl.SSLContext | None:
    """The server side of TLS from uvicorn's options (`Settings.tls`); None without a
    certificate."""
    if not tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls["ssl_certfile"], tls["ssl_keyfile"])
    return context


class Session:
    """One client connection: startup, authentication, then statements."""

    def __init__(self, server: PgWireServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.server, self.serving = server, server.serving
        self.reader, self.writer = reader, writer
        self.decoder = FrontendMessageDecoder()
        self.statements: dict[str, tuple[str, list[int]]] = {}
        self.portals: dict[str, Portal] = {}
        self.status = TransactionStatus.IDLE
        self.skipping = False  # after an error in an extended-query batch, until Sync
        self.encrypted = False

    async def run(self) -> None:
        timeout = self.serving.settings.http_read_timeout_seconds
        try:
            await asyncio.wait_for(self._start(), timeout)
        except TimeoutError:
            raise PgError("08006", f"startup did not finish within {timeout:g} s",
                          "FATAL") from None
        while True:
            message = await self._next()
            if isinstance(message, Terminate):
                return
            await self._handle(message)

    # --- startup --------------------------------------------------------------------------

    async def _start(self) -> None:
        while True:
            message = await self._next()
            if isinstance(message, SSLRequest) and self.server.tls and not self.encrypted:
                await self._start_tls(self.server.tls)
                continue
            if isinstance(message, SSLRequest | GSSEncRequest):
                self.writer.write(b"N")  # not (or no more) encryption: go on as it is
                continue
            if isinstance(message, CancelRequest):
                raise ConnectionError("cancel requests are not supported")
            if not isinstance(message, StartupMessage):
                raise PgError("08P01", f"expected a startup message, got "
                              f"{type(message).__name__}", "FATAL")
            break
        await self._authenticate(self.serving.keyring)
        self.send(AuthenticationOk())
        for name in _STARTUP_STATUSES:
            self.send(ParameterStatus(name=name, value=SETTINGS[name]))
        self.send(BackendKeyData(process_id=secrets.randbits(31),
                                 secret_key=secrets.token_bytes(4)))
        self.decoder.phase = ConnectionPhase.READY
        self.send(ReadyForQuery(status=self.status))
        await self.writer.drain()

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        if self.decoder.buffered:  # bytes sent in the clear must not pass for encrypted ones
            raise PgError("08P01", "protocol violation: data after SSLRequest, before the "
                          "TLS handshake", "FATAL")
        self.writer.write(b"S")
        await self.writer.drain()
        try:
            await self.writer.start_tls(context)
        except (ssl.SSLError, OSError) as failed:
            raise ConnectionError(f"TLS handshake failed: {failed}") from None
        self.encrypted = True

    async def _authenticate(self, keyring: Keyring) -> None:
        if keyring.open:
            return
        self.decoder.phase = ConnectionPhase.AUTHENTICATING
        self.send(AuthenticationCleartextPassword())
        await self.writer.drain()
        message = await self._next()
        if not isinstance(message, PasswordMessage):
            raise PgError("28000", "expected a password message", "FATAL")
        password = message.password
        key = password.decode(errors="replace") if isinstance(password, bytes) else password
        try:
            keyring.authorize({"X-API-Key": key.rstrip("\x00")}, "query")
        except AuthError as refused:
            code = "28P01" if refused.status == 401 else "28000"
            rule = refused.rule.split(";")[0]  # the HTTP hint about headers does not apply
            raise PgError(code, f"password authentication failed: {rule}", "FATAL") from None

    # --- messages -------------------------------------------------------------------------

    async def _next(self) -> PGMessage:
        while True:
            try:
                message = next(self.decoder, None)
            except PygwireError as broken:
                raise PgError("08P01", f"protocol violation: {broken}", "FATAL") from None
            if message is not None:
                return message
            if self.decoder.buffered > _MAX_MESSAGE_BYTES:
                raise PgError("54000", f"message longer than {_MAX_MESSAGE_BYTES} bytes",
                              "FATAL")
            data = await self.reader.read(_READ_BYTES)
            if not data:
                raise ConnectionError("the client closed the connection")
            self.decoder.feed(data)

    def send(self, message: BackendMessage) -> None:
        self.writer.write(message.to_wire())

    async def send_now(self, message: BackendMessage) -> None:
        try:
            self.send(message)
            await self.writer.drain()
        except ConnectionError:
            pass

    async def _handle(self, message: PGMessage) -> None:
        if isinstance(message, Query):
            await self._simple_query(message.query_string)
        elif isinstance(message, Sync):
            self.skipping = False
            self.send(ReadyForQuery(status=self.status))
        elif isinstance(message, Flush):
            pass
        elif not self.skipping:
            try:
                await self._extended(message)
            except PgError as error:
                self._failed(error)
                self.skipping = True
        await self.writer.drain()

    def _failed(self, error: PgError) -> None:
        self.server.count("error")
        if self.status == TransactionStatus.IN_TRANSACTION:
            self.status = TransactionStatus.ERROR_TRANSACTION
        self.send(error.response())

    async def _simple_query(self, text: str) -> None:
        statements = split_statements(text)
        if not statements:
            self.send(EmptyQueryResponse())
        for sql in statements:
            try:
                answer = await self._answer(sql, [])
            except PgError as error:
                self._failed(error)
                break
            if answer.columns is not None:
                self.send(answer.description())
            self._send_rows(answer)
        self.send(ReadyForQuery(status=self.status))

    async def _extended(self, message: PGMessage) -> None:
        if isinstance(message, Parse):
            if len(split_statements(message.query)) > 1:
                raise PgError("42601", "cannot insert multiple commands into a prepared "
                              "statement")
            self.statements[message.statement] = (message.query, message.param_types)
            self.send(ParseComplete())
        elif isinstance(message, Bind):
            sql, types = self._statement(message.statement)
            if any(message.result_formats):
                raise PgError("0A000", "binary result format is not supported; ask for text")
            params = bind_parameters(message, types)
            self.portals[message.portal] = Portal(sql, params)
            self.send(BindComplete())
        elif isinstance(message, Describe):
            await self._describe(message)
        elif isinstance(message, Execute):
            portal = self._portal(message.portal)
            answer = portal.answer or await self._answer(portal.sql, portal.params)
            portal.answer = None
            self._send_rows(answer)
        elif isinstance(message, Close):
            names = self.statements if message.kind == "S" else self.portals
            names.pop(message.name, None)
            self.send(CloseComplete())
        else:
            raise PgError("0A000", f"{type(message).__name__} is not supported")

    async def _describe(self, message: Describe) -> None:
        if message.kind == "P":
            portal = self._portal(message.name)
            portal.answer = await self._answer(portal.sql, portal.params)
            self.send(portal.answer.description())
            return
        sql, types = self._statement(message.name)
        count = parameter_count(sql)
        oids = [*types, *[0] * (count - len(types))][:max(count, len(types))]
        self.send(ParameterDescription(type_oids=[oid or TEXT_OID for oid in oids]))
        shape = await self._answer(sql, [None] * len(oids), describe=True)
        self.send(shape.description())

    def _statement(self, name: str) -> tuple[str, list[int]]:
        if name not in self.statements:
            raise PgError("26000", f"prepared statement {name!r} does not exist")
        return self.statements[name]

    def _portal(self, name: str) -> Portal:
        if name not in self.portals:
            raise PgError("34000", f"portal {name!r} does not exist")
        return self.portals[name]

    def _send_rows(self, answer: Answer) -> None:
        self.writer.write(answer.rows)
        if answer.notice:
            self.send(NoticeResponse(fields={"S": "WARNING", "V": "WARNING", "C": "01000",
                                             "M": answer.notice}))
        self.send(CommandComplete(tag=answer.tag))

    # --- statements -----------------------------------------------------------------------

    async def _answer(self, sql: str, params: list[Any], describe: bool = False) -> Answer:
        command = session_command(sql)
        if command is not None and describe:
            return Answer(command)
        failed = self.status == TransactionStatus.ERROR_TRANSACTION
        if failed and command not in ("COMMIT", "ROLLBACK"):
            raise PgError("25P02", "current transaction is aborted, commands ignored until "
                          "end of transaction block")
        if command in ("BEGIN", "COMMIT", "ROLLBACK"):
            self.status = (TransactionStatus.IN_TRANSACTION if command == "BEGIN"
                           else TransactionStatus.IDLE)
            return Answer("ROLLBACK" if failed else command)
        if command is not None:
            return Answer(command)
        setting = shown_setting(sql)
        if setting is not None:
            return Answer("SHOW", [setting], ["VARCHAR"], data_row((SETTINGS[setting],)))
        rows = await self._run(postgres_spelling(sql), params, describe)
        self.server.count("ok")
        return Answer.of(rows)

    async def _run(self, sql: str, params: list[Any], describe: bool) -> EncodedRows:
        serving = self.serving
        problem = restoring_problem(serving)
        if problem:
            raise PgError("57P03", problem)
        try:
            result = await serving.sql.run(lambda worker: run_sql(
                serving.duck, serving.views, sql, worker, params=params, row_format="pg",
                describe=describe))
        except SandboxBusy as busy:
            raise PgError("53000", f"{busy}; retry shortly") from None
        except QueryError as refused:
            raise PgError(_sqlstate(refused.rule, serving), refused.rule) from None
        return result.rows


def _sqlstate(rule: str, serving: Serving) -> str:
    limits = serving.sql.limits
    if rule == limits.timeout_rule:
        return "57014"  # query_canceled
    if rule == limits.memory_rule:
        return "53200"  # out_of_memory
    if "read-only" in rule:
        return "25006"  # read_only_sql_transaction
    return "42000"  # syntax_error_or_access_rule_violation


def session_command(sql: str) -> str | None:
    """The tag of a statement that only a session answers (transactions, SET, DISCARD...),
    or None for one the sandbox runs."""
    words = _LEADING_NOISE.sub("", sql).split(None, 1)
    first = words[0].lower().rstrip(";") if words else ""
    return _TRANSACTION_TAGS.get(first) or _IGNORED.get(first)


def shown_setting(sql: str) -> str | None:
    """The setting a `SHOW name` names, if it is one of SETTINGS (else DuckDB's own SHOW,
    as SHOW TABLES, runs in the sandbox)."""
    words = _LEADING_NOISE.sub("", sql).rstrip("; \n\t").lower().split()
    if len(words) < 2 or words[0] != "show":
        return None
    name = "transaction_isolation" if words[1:] == ["transaction", "isolation", "level"] \
        else words[1] if len(words) == 2 else ""
    return _SHOWN.get(name)


def split_statements(text: str) -> list[str]:
    """The statements of a simple query, split at semicolons outside quotes, comments and
    dollar quotes; empty ones dropped."""
    statements, start = [], 0
    for end in _semicolons(text):
        statements.append(text[start:end])
        start = end + 1
    statements.append(text[start:])
    return [sql for sql in statements if _LEADING_NOISE.sub("", sql).strip()]


_TOKENS = re.compile(r"'(?:[^']|'')*'?|\"(?:[^\"]|\"\")*\"?|--[^\n]*|/\*.*?(?:\*/|$)"
                     r"|(\$\w*\$).*?(?:\1|$)|;", re.DOTALL)


def _semicolons(text: str) -> Iterator[int]:
    for token in _TOKENS.finditer(text):
        if token.group() == ";":
            yield token.start()


def parameter_count(sql: str) -> int:
    """The highest `$n` outside quotes and comments."""
    unquoted = _TOKENS.sub(lambda token: ";" if token.group() == ";" else " ", sql)
    return max((int(n) for n in re.findall(r"\$(\d+)", unquoted)), default=0)


# --- parameters -----------------------------------------------------------------------------

_INTEGERS = {20: "!q", 21: "!h", 23: "!i", 26: "!I"}
_FLOATS = {700: "!f", 701: "!d"}
_TEXT_OIDS = {0, 18, 19, 25, 705, 1042, 1043}


def bind_parameters(bind: Bind, types: Sequence[int]) -> list[Any]:
    """Each parameter as a Python value: text ones as the client wrote them (typed by their
    OID where it says a number or a boolean; else DuckDB casts them where they are used),
    binary ones decoded for the common types."""
    formats = bind.param_formats or [0]
    if len(formats) not in (1, len(bind.param_values)):
        raise PgError("08P01", f"bind has {len(formats)} parameter formats for "
                      f"{len(bind.param_values)} parameters")
    values = []
    for index, raw in enumerate(bind.param_values):
        oid = types[index] if index < len(types) else 0
        binary = (formats[0] if len(formats) == 1 else formats[index]) == 1
        try:
            values.append(None if raw is None else
                          _binary_value(raw, oid) if binary else _text_value(raw, oid))
        except (ValueError, struct.error, UnicodeDecodeError) as bad:
            raise PgError("22P02", f"parameter ${index + 1}: invalid value for type OID "
                          f"{oid}: {bad}") from None
    return values


def _text_value(raw: bytes, oid: int) -> Any:
    text = raw.decode()
    if oid in _INTEGERS:
        return int(text)
    if oid in _FLOATS:
        return float(text)
    if oid == 16:
        return text.lower() in ("t", "true", "1", "on", "yes")
    return text


def _binary_value(raw: bytes, oid: int) -> Any:
    if oid in _INTEGERS:
        return struct.unpack(_INTEGERS[oid], raw)[0]
    if oid in _FLOATS:
        return struct.unpack(_FLOATS[oid], raw)[0]
    if oid == 16:
        return raw != b"\x00"
    if oid in _TEXT_OIDS:
        return raw.decode()
    if oid == 1082:
        return date(2000, 1, 1) + timedelta(days=struct.unpack("!i", raw)[0])
    if oid in (1114, 1184):
        instant = _POSTGRES_EPOCH + timedelta(microseconds=struct.unpack("!q", raw)[0])
        return instant if oid == 1184 else instant.replace(tzinfo=None)
    raise ValueError("binary format of this type is not supported; send it as text")
