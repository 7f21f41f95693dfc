"""The PostgreSQL wire endpoint with real clients: psycopg (the extended query protocol with
parameters, prepared statements, transactions) and Debian's psql (its catalog queries), and
a raw protocol client (pygwire) for the error codes and the inputs no driver sends.

The serving API runs over real HTTP as in test_serving, the endpoint beside it; answers are
checked against POST /sql, which test_serving checks against an independent recompute.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pygwire import FrontendConnection
from pygwire.messages import (
    Bind,
    ErrorResponse,
    PasswordMessage,
    PGMessage,
    Query,
    ReadyForQuery,
    StartupMessage,
    Sync,
)
from test_serving import (
    CUT_1,
    PAGEVIEWS,
    Lake,
    metric,
    publish,
    self_signed,
    speed_layer,
    start_lake,
    web_traffic,
)

from lambdalake.example import project
from lambdalake.serving.pgwire import PgWireServer
from lambdalake.serving.server import start_postgres

KEY = "query-key"
KEYS: list[Any] = [KEY, {"key": "ingest-only", "scopes": ["ingest"], "name": "producer"}]
SQLALCHEMY_VERSION = re.compile(r".*(?:PostgreSQL|EnterpriseDB) (\d+)\.?(\d+)?(?:\.(\d+))?")


class Endpoint:
    def __init__(self, lake: Lake, server: PgWireServer):
        self.lake, self.server = lake, server

    def connect(self, password: str = KEY, **options: Any) -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.server.port, user="anyone",
                               dbname="lambdalake", password=password, connect_timeout=10,
                               **options)

    def psql(self, command: str, sslmode: str = "prefer") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["psql", "-X", "-h", "127.0.0.1", "-p", str(self.server.port), "-U", "someone",
             "-v", "ON_ERROR_STOP=1", "-c", command, "lambdalake"],
            env=os.environ | {"PGPASSWORD": KEY, "PGCONNECT_TIMEOUT": "10",
                              "PGSSLMODE": sslmode},
            capture_output=True, text=True, timeout=60)

    def sql(self, statement: str) -> list[list[Any]]:
        reply = self.lake.sql(statement)
        assert reply.status_code == 200, reply.text
        return reply.json()["rows"]


@contextmanager
def started(lake: Lake) -> Iterator[Endpoint]:
    server = start_postgres(lake.server.server, port=0)
    assert server is not None
    try:
        yield Endpoint(lake, server)
    finally:
        server.stop()


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    with start_lake(tmp_path, api_keys=KEYS) as lake:
        traffic = web_traffic()
        lake.realtime.upsert(speed_layer(traffic).drain())
        publish(lake.store, "v1", CUT_1, traffic)
        lake.wait_for_version("v1")
        with started(lake) as endpoint:
            yield endpoint


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- psycopg -------------------------------------------------------------------------------


def test_psycopg_reads_the_merged_views_as_sql_does(endpoint: Endpoint) -> None:
    statement = (f"SELECT bucket, url, pageviews, visitors FROM {PAGEVIEWS.name} "
                 "ORDER BY bucket, url")
    with endpoint.connect() as connection:
        cursor = connection.execute(statement)
        rows = cursor.fetchall()
        assert [column.name for column in cursor.description] == \
            ["bucket", "url", "pageviews", "visitors"]
        assert [column.type_code for column in cursor.description] == [1184, 25, 20, 20]
    assert rows and all(isinstance(row[0], datetime) and row[0].tzinfo for row in rows)
    assert [[iso(bucket), *rest] for bucket, *rest in rows] == endpoint.sql(statement)


def test_psycopg_parameters_prepared_statements_and_binary_parameters(
    endpoint: Endpoint,
) -> None:
    statement = (f"SELECT url, sum(pageviews) AS pageviews FROM {PAGEVIEWS.name} "
                 "WHERE bucket >= %s AND url <> %s AND pageviews > %s GROUP BY url ORDER BY url")
    since = datetime(2026, 11, 23, 2, tzinfo=UTC)
    want = endpoint.sql(statement.replace("%s", "'2026-11-23T02:00:00Z'", 1)
                        .replace("%s", "'/docs'", 1).replace("%s", "0", 1))
    assert want
    with endpoint.connect() as connection:
        for _ in range(7):  # psycopg prepares a statement on its fifth run
            rows = connection.execute(statement, [since, "/docs", 0]).fetchall()
            assert [[url, int(total)] for url, total in rows] == want
        binary = connection.execute(statement.replace("%s", "%b"), [since, "/docs", 0])
        assert [[url, int(total)] for url, total in binary.fetchall()] == want
        typed = connection.execute("SELECT %s + 1, %s * 2, %s, %s", [41, 1.5, True, "text"])
        assert typed.fetchone() == (42, 3.0, True, "text")
        assert connection.execute("SELECT %s::DATE", ["2026-11-23"]).fetchone() == \
            (date(2026, 11, 23),)


def test_session_statements_are_answered_and_change_nothing(endpoint: Endpoint) -> None:
    with endpoint.connect() as connection:  # not autocommit: psycopg sends BEGIN first
        connection.execute("SET application_name = 'grafana'")
        connection.execute("SET extra_float_digits = 3")
        assert connection.execute("SHOW transaction isolation level").fetchone() == \
            ("read committed",)
        assert connection.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
        version, schema = connection.execute("SELECT version(), current_schema()").fetchone()
        assert SQLALCHEMY_VERSION.match(version) and schema == "main"
        assert connection.execute("SELECT pg_catalog.version()").fetchone() == (version,)
        connection.commit()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            connection.execute(f"DELETE FROM {PAGEVIEWS.name}")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            connection.execute("SELECT 1")
        connection.rollback()
        assert connection.execute("SELECT 1").fetchone() == (1,)
        connection.execute("DISCARD ALL")
    assert endpoint.sql(f"SELECT count(*) FROM {PAGEVIEWS.name}")[0][0] > 0


def test_a_statement_error_ends_only_the_statement(endpoint: Endpoint) -> None:
    with endpoint.connect(autocommit=True) as connection:
        for statement, error in [
            ("SELEC 1", psycopg.errors.SyntaxErrorOrAccessRuleViolation),
            ("SELECT * FROM nowhere", psycopg.errors.SyntaxErrorOrAccessRuleViolation),
            ("SELECT * FROM read_csv('/etc/passwd')",
             psycopg.errors.SyntaxErrorOrAccessRuleViolation),
            ("COPY (SELECT 1) TO '/tmp/out.csv'", psycopg.errors.ReadOnlySqlTransaction),
            ("SELECT %s; SELECT 2", psycopg.errors.SyntaxError),  # two in one prepared
        ]:
            with pytest.raises(error):
                connection.execute(statement, [1] if "%s" in statement else None)
            assert connection.execute("SELECT 7").fetchone() == (7,)


# --- catalog queries of the tools ----------------------------------------------------------


def test_psql_lists_and_describes_the_views(endpoint: Endpoint) -> None:
    tables = endpoint.psql(r"\dt")
    assert tables.returncode == 0, tables.stderr
    for name in project.views:
        assert re.search(rf"main\s+\|\s+{name}\s+\|\s+table", tables.stdout), tables.stdout
    described = endpoint.psql(rf"\d {PAGEVIEWS.name}")
    assert described.returncode == 0, described.stderr
    columns = re.findall(r"^\s*(\w+)\s+\|\s+(\w+)", described.stdout, re.MULTILINE)
    assert columns[1:] == [("bucket", "timestamptz"), ("url", "varchar"),
                           ("pageviews", "int8"), ("visitors", "int8")]
    for command in (r"\d", r"\dt+", r"\dn", r"\l"):
        done = endpoint.psql(command)
        assert done.returncode == 0 and "ERROR" not in done.stderr, (command, done.stderr)
    counted = endpoint.psql(f"SELECT count(*) AS n FROM {PAGEVIEWS.name}; SELECT 1 AS one")
    want = endpoint.sql(f"SELECT count(*) FROM {PAGEVIEWS.name}")[0][0]
    assert counted.returncode == 0 and f"\n {want}\n" in counted.stdout, counted.stdout


def test_information_schema_and_pg_catalog_queries_of_dashboards(endpoint: Endpoint) -> None:
    with endpoint.connect(autocommit=True) as connection:
        tables = connection.execute(  # Grafana's table list, Superset's and Metabase's alike
            "SELECT table_name FROM information_schema.tables WHERE table_schema = "
            "current_schema() AND table_type = 'BASE TABLE' ORDER BY 1").fetchall()
        assert [name for (name,) in tables] == sorted(project.views)
        columns = connection.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = %s ORDER BY ordinal_position", [PAGEVIEWS.name]).fetchall()
        assert columns == [("bucket", "TIMESTAMP WITH TIME ZONE"), ("url", "VARCHAR"),
                           ("pageviews", "BIGINT"), ("visitors", "BIGINT")]
        attributes = connection.execute(  # a JDBC getColumns, trimmed
            "SELECT n.nspname, c.relname, a.attname, t.typname, a.attnum "
            "FROM pg_catalog.pg_namespace n JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid "
            "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid "
            "JOIN pg_catalog.pg_type t ON a.atttypid = t.oid "
            "WHERE c.relkind IN ('r', 'v') AND c.relname = %s AND a.attnum > 0 "
            "ORDER BY a.attnum", [PAGEVIEWS.name]).fetchall()
        assert [(name, kind) for _, _, name, kind, _ in attributes] == \
            [("bucket", "timestamptz"), ("url", "varchar"), ("pageviews", "int8"),
             ("visitors", "int8")]
        described = connection.execute(f"DESCRIBE {PAGEVIEWS.name}").fetchall()
        assert [row[:2] for row in described] == columns


# --- keys ----------------------------------------------------------------------------------


def test_an_api_key_is_the_password(endpoint: Endpoint) -> None:
    assert startup_error(endpoint, "not-a-key") == ("FATAL", "28P01")
    assert startup_error(endpoint, "ingest-only") == ("FATAL", "28000")
    with pytest.raises(psycopg.OperationalError, match="lacks the 'query' scope"):
        endpoint.connect(password="ingest-only")
    with pytest.raises(psycopg.OperationalError, match="unknown API key"):
        endpoint.connect(password="not-a-key")
    with endpoint.connect() as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)


def startup_error(endpoint: Endpoint, password: str) -> tuple[str, str]:
    with RawClient(endpoint.server.port) as client:
        client.send(StartupMessage(params={"user": "anyone", "database": "x"}))
        client.receive_until(lambda message: True)  # AuthenticationCleartextPassword
        client.send(PasswordMessage(password=password))
        error = client.receive_until(lambda message: isinstance(message, ErrorResponse))
        assert isinstance(error, ErrorResponse)
        assert client.closed_by_server()
        return error.severity, error.code


# --- bad input -----------------------------------------------------------------------------


class RawClient:
    """A socket speaking the protocol as the test says, through pygwire's codec."""

    def __init__(self, port: int):
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.connection = FrontendConnection(strict=False)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.socket.close()

    def send(self, message: PGMessage) -> None:
        self.socket.sendall(self.connection.send(message))

    def receive_until(self, done: Any) -> PGMessage:
        while True:
            data = self.socket.recv(65536)
            assert data, "the server closed the connection"
            for message in self.connection.receive(data):
                if done(message):
                    return message

    def closed_by_server(self) -> bool:
        try:
            return self.socket.recv(65536) == b""
        except ConnectionResetError:
            return True


BROKEN_STARTUPS = [
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # SSLRequest, answered "N"; then the socket closes
    b"\x00\x00\x00\x03",  # a length shorter than the length field
    b"\x7f\xff\xff\xff" + b"x" * 1000,  # 2 GB announced
    b"\x00\x00\x00\x10\x00\x09\x00\x00user\x00",  # protocol 9.0
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    bytes(range(256)) * 8,
]


@pytest.mark.parametrize("garbage", BROKEN_STARTUPS)
def test_a_broken_startup_ends_only_its_own_connection(
    endpoint: Endpoint, garbage: bytes,
) -> None:
    with endpoint.connect(autocommit=True) as bystander:
        with RawClient(endpoint.server.port) as client:
            client.socket.sendall(garbage)
            client.socket.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := client.socket.recv(65536):
                reply += chunk
        assert reply in (b"", b"N") or reply.startswith(b"E"), reply[:100]
        assert bystander.execute("SELECT 1").fetchone() == (1,)
    assert endpoint.lake.get("/healthz").status_code == 200


def test_broken_messages_after_startup_end_only_their_connection(endpoint: Endpoint) -> None:
    ready = b"Z\x00\x00\x00\x05I"
    with endpoint.connect(autocommit=True) as bystander:
        for message in [
            b"B\x00\x00\x00\x20nosuchportal\x00nosuchstatement\x00\x00\x00\x00",  # then Sync
            b"Q\x00\x00\x00\x04",  # a query without its string
            b"P\x00\x00\x00\x09\xff\xfe\x00\x00\x00",  # not UTF-8, cut short
            b"?\x00\x00\x00\x04",  # no such message
            b"D\x00\x00\x00\x06Sx",  # describe without a terminator
            b"E\x7f\xff\xff\xff",  # 2 GB announced
        ]:
            with authenticated(endpoint) as client:
                client.socket.sendall(message + b"S\x00\x00\x00\x04")
                reply = drain(client.socket)
                assert reply.endswith(ready) or b"E" in reply[:1], (message, reply[:200])
            assert bystander.execute("SELECT 2").fetchone() == (2,)
        with authenticated(endpoint) as client:  # after an error and Sync, it goes on
            client.send(Bind(portal="x", statement="no-such-statement"))
            client.send(Sync())
            assert b"26000" in drain(client.socket)
            client.send(Query(query_string="SELECT 40 + 2"))
            assert b"42" in drain(client.socket)


def authenticated(endpoint: Endpoint) -> RawClient:
    client = RawClient(endpoint.server.port)
    client.send(StartupMessage(params={"user": "anyone", "database": "x"}))
    client.receive_until(lambda message: True)
    client.send(PasswordMessage(password=KEY))
    client.receive_until(lambda message: isinstance(message, ReadyForQuery))
    return client


def drain(sock: socket.socket, quiet_s: float = 0.5) -> bytes:
    """What the server sends until it closes or falls quiet."""
    sock.settimeout(quiet_s)
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        sock.settimeout(10)
    return reply


def test_stalled_clients_do_not_hold_up_the_others(tmp_path: Path) -> None:
    with (start_lake(tmp_path, api_keys=KEYS, http_read_timeout_seconds=1) as lake,
          started(lake) as endpoint):
        stalled = [socket.create_connection(("127.0.0.1", endpoint.server.port))
                   for _ in range(20)]
        for sock in stalled:
            sock.sendall(b"\x00\x00\x00\x50\x00\x03")  # a startup, never finished
        with endpoint.connect() as connection:
            assert connection.execute("SELECT 1").fetchone() == (1,)
        time.sleep(1.5)
        assert all(drain(sock, 1.0).startswith(b"E") for sock in stalled)
        for sock in stalled:
            sock.close()


# --- the sandbox's limits ------------------------------------------------------------------


def test_the_sandbox_limits_hold_on_the_wire(tmp_path: Path) -> None:
    with (start_lake(tmp_path, api_keys=KEYS, sql_timeout_seconds=1, sql_concurrency=1) as lake,
          started(lake) as endpoint):
        with endpoint.connect(autocommit=True) as connection:
            with pytest.raises(psycopg.errors.QueryCanceled, match="longer than 1 s"):
                connection.execute("SELECT sum(a.range * b.range) "
                                   "FROM range(100000) a, range(100000) b")
            notices: list[str] = []  # a Diagnostic is valid only within the handler
            connection.add_notice_handler(
                lambda notice: notices.append(notice.message_primary or ""))
            rows = connection.execute("SELECT range AS n FROM range(20000)").fetchall()
            assert len(rows) == 10_000 and rows[-1] == (9_999,)
            assert notices and "truncated" in notices[0]
            busy = threading.Thread(target=lake.sql, args=[
                "SELECT count(*) FROM range(100000) a, range(100000) b"])
            busy.start()
            time.sleep(0.3)
            with pytest.raises(psycopg.errors.InsufficientResources):
                connection.execute("SELECT 1")
            busy.join()
            assert connection.execute("SELECT 3").fetchone() == (3,)
        assert lake.get("/healthz").json()["loops"]["pgwire"] == "ok"
        assert metric(lake, "lambdalake_serving_pg_statements_total", outcome="error") == 2


def test_the_endpoint_says_so_while_state_is_restoring(tmp_path: Path) -> None:
    with start_lake(tmp_path) as lake:
        lake.realtime.restored.clear()  # as while the speed layer's state is replayed
        with started(lake) as endpoint, endpoint.connect(autocommit=True) as connection:
            with pytest.raises(psycopg.errors.CannotConnectNow, match="being restored"):
                connection.execute("SELECT 1")
            lake.realtime.restored.set()
            assert connection.execute("SELECT 1").fetchone() == (1,)


def test_data_rows_are_postgres_text(endpoint: Endpoint) -> None:
    with endpoint.connect(autocommit=True) as connection:
        row = connection.execute(
            "SELECT true, 'x'::BLOB, [1, 2], ['a', NULL], 1.5::DECIMAL(4,2), "
            "'infinity'::DOUBLE, INTERVAL 90 MINUTE, DATE '2026-11-23', "
            "TIMESTAMP '2026-11-23 10:00:00', {'a': 1}").fetchone()
    assert row[:8] == (True, b"x", [1, 2], ["a", None], Decimal("1.50"), float("inf"),
                       timedelta(minutes=90), date(2026, 11, 23))
    assert row[8] == datetime(2026, 11, 23, 10) and row[9] == {"a": 1}


def test_a_taken_port_stops_start_up_at_once_saying_so(endpoint: Endpoint) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started_at = time.monotonic()
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}: .*address already in use"):
            start_postgres(endpoint.lake.server.server, port=port)
        assert time.monotonic() - started_at < 5


# --- TLS -----------------------------------------------------------------------------------


def test_tls_with_a_certificate_and_n_without(tmp_path: Path) -> None:
    """With a certificate the SSLRequest of sslmode=require is answered 'S' and the session
    runs encrypted (psycopg, psql); without one it is answered 'N', which require refuses."""
    cert, key = self_signed(tmp_path)
    with start_lake(tmp_path, api_keys=KEYS, ready=False, tls_certfile=cert,
                    tls_keyfile=key) as lake, started(lake) as endpoint:
        with endpoint.connect(sslmode="require") as connection:
            assert connection.pgconn.ssl_in_use
            counted = connection.execute(f"SELECT count(*) FROM {PAGEVIEWS.name}")
            assert counted.fetchone() == (0,)
        with endpoint.connect(sslmode="verify-full", sslrootcert=str(cert)) as connection:
            assert connection.pgconn.ssl_in_use  # and the certificate checked
        done = endpoint.psql("\\conninfo", sslmode="require")
        assert done.returncode == 0, done.stderr
        assert "SSL connection" in done.stdout
        with RawClient(endpoint.server.port) as client:  # clear bytes must not pass as TLS ones
            client.socket.sendall(BROKEN_STARTUPS[0] + b"\x00\x00\x00\x08\x00\x03\x00\x00")
            assert client.socket.recv(1) == b"E"
            assert b"data after SSLRequest" in client.socket.recv(4096)
    with start_lake(tmp_path / "clear", api_keys=KEYS, ready=False) as lake, \
            started(lake) as endpoint, \
            pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        endpoint.connect(sslmode="require")
