"""API keys with scopes: the settings that refuse bad keys at start-up, and every route of the
gateway and the serving API over real HTTP (no key 401, wrong scope 403, right scope 2xx),
with no key ever written to a log.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from test_flow import Flow
from test_serving import PAGEVIEWS, start_lake

from lambdalake.auth import AuthError, Keyring, credentials, fingerprint
from lambdalake.eventlog import now_ms
from lambdalake.example import project as example
from lambdalake.functions import environment, ingest
from lambdalake.functions.runtime.function import LocalFunction
from lambdalake.functions.runtime.gateway import Gateway
from lambdalake.functions.runtime.template import load_template
from lambdalake.logs import JsonFormatter
from lambdalake.settings import Settings

FULL = "full-access-key-0123"  # a plain string: every scope
INGEST = "ingest-only-key-4567"
QUERY = "query-only-key-89ab"
ADMIN = "admin-only-key-cdef"
KEYS: list[Any] = [
    FULL,
    {"key": INGEST, "scopes": ["ingest"], "name": "producer"},
    {"key": QUERY, "scopes": ["query"], "name": "grafana"},
    {"key": ADMIN, "scopes": ["admin"]},
]
SECRETS = (FULL, INGEST, QUERY, ADMIN)
# `/`: the dashboard's page holds no data; the queries it makes need a key
OPEN_PATHS = {"/healthz", "/readyz", "/docs", "/docs/assets/swagger-ui-bundle.js",
              "/openapi.json", "/"}


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


# ---------------------------------------------------------------- keys in the settings


@pytest.mark.parametrize("bad", ["", " ", "\t\n", " padded ", "two words", "nul\x00", "clé"])
def test_settings_refuse_a_key_no_header_can_carry(
    bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMBDALAKE_API_KEYS", json.dumps([bad, "real-key"]))
    with pytest.raises(ValidationError) as refused:
        Settings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("api_keys", 0, "key")
    assert "empty" in error["msg"] or "visible ASCII" in error["msg"]
    if bad.strip():
        assert bad not in str(refused.value)  # the refused key is not echoed


def test_plain_keys_hold_every_scope_and_objects_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAMBDALAKE_API_KEYS", json.dumps(KEYS))
    keys = Settings().api_keys
    assert [sorted(k.scopes) for k in keys] == [
        ["admin", "ingest", "query"], ["ingest"], ["query"], ["admin"]
    ]
    assert [k.label for k in keys] == [fingerprint(FULL), "producer", "grafana",
                                       fingerprint(ADMIN)]
    assert all(secret not in repr(keys) for secret in SECRETS)


@pytest.mark.parametrize(
    ("entry", "rule"),
    [
        ({"key": "k1", "scopes": []}, "at least 1"),
        ({"key": "k1", "scopes": ["write"]}, "'ingest', 'query' or 'admin'"),
        ({"key": "k1", "role": "admin"}, "Extra inputs"),
        ({"scopes": ["query"]}, "Field required"),
    ],
)
def test_settings_refuse_bad_key_objects(entry: dict[str, Any], rule: str) -> None:
    with pytest.raises(ValidationError, match=rule):
        Settings(api_keys=[entry])


def test_secrets_files_add_keys_in_json_or_toml(tmp_path: Path) -> None:
    as_json, as_toml = tmp_path / "keys.json", tmp_path / "keys.toml"
    as_json.write_text(json.dumps([{"key": QUERY, "scopes": ["query"], "name": "grafana"}]))
    as_toml.write_text(f'[[keys]]\nkey = "{INGEST}"\nscopes = ["ingest"]\nname = "producer"\n')
    for path, name in ((as_json, "grafana"), (as_toml, "producer")):
        keyring = Settings(api_keys=[FULL], api_keys_file=path).keyring
        assert [k["name"] for k in keyring.described()] == [fingerprint(FULL), name]


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        (None, "No such file"),
        ("[", "not valid JSON"),
        ('["ok-key", " "]', "entry 1.key: must not be empty"),
        (json.dumps([QUERY, QUERY]), "one key is given twice"),
    ],
)
def test_a_bad_secrets_file_is_refused_naming_it(
    tmp_path: Path, content: str | None, rule: str
) -> None:
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValidationError) as refused:
        Settings(api_keys_file=path)
    assert f"api_keys_file {path}: " in str(refused.value) or "api_keys:" in str(refused.value)
    assert rule in str(refused.value)
    assert QUERY not in str(refused.value)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["", "real-key"], "error: setting api_keys.0.key: must not be empty or whitespace"),
        (["real-key", {"key": "real-key", "scopes": ["query"]}],
         f"error: setting api_keys: one key is given twice ('{fingerprint('real-key')}'"),
    ],
    ids=["empty-key", "same-key-twice"],
)
def test_lambdalake_up_refuses_bad_keys_in_one_line(
    tmp_path: Path, keys: list[Any], message: str
) -> None:
    env = os.environ | {"LAMBDALAKE_API_KEYS": json.dumps(keys),
                        "LAMBDALAKE_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "lambdalake.stack.cli", "up"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert "real-key" not in done.stderr and not (tmp_path / "home").exists()


# ---------------------------------------------------------------- the key model


@pytest.mark.parametrize(
    ("headers", "header", "offered"),
    [
        ({}, "X-API-Key", None),
        ({"x-api-key": " k1 "}, "X-API-Key", "k1"),
        ({"X-Api-Key": "k1", "Authorization": "Bearer k2"}, "X-API-Key", "k1"),
        ({"authorization": "bearer  k2"}, "Authorization", "k2"),
        ({"Authorization": "Basic azI6"}, "Authorization", None),
        ({"Authorization": "Bearer"}, "Authorization", None),
    ],
)
def test_credentials_come_from_either_header_in_any_case(
    headers: dict[str, str], header: str, offered: str | None
) -> None:
    found = credentials(headers)
    assert (found.header, found.key) == (header, offered)


def test_a_keyring_answers_401_403_or_the_key() -> None:
    keyring = Settings(api_keys=KEYS).keyring
    for headers, status in (({}, 401), (key("nope"), 401), (key(INGEST), 403)):
        with pytest.raises(AuthError) as refused:
            keyring.authorize(headers, "query")
        assert refused.value.status == status
        assert all(secret not in str(refused.value) for secret in SECRETS)
    assert keyring.authorize(bearer(QUERY), "query").label == "grafana"
    assert keyring.authorize(key(FULL), "admin").label == fingerprint(FULL)
    assert (keyring.key_for("ingest"), keyring.key_for("admin")) == (FULL, FULL)
    assert Keyring([]).authorize({}, "admin") is None  # no keys configured: open


# ---------------------------------------------------------------- every route over HTTP


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record of every logger, at every level, while the test runs."""
    with caplog.at_level(logging.DEBUG):
        yield caplog


def assert_no_key_logged(logs: pytest.LogCaptureFixture) -> None:
    records = logs.get_records("setup") + logs.get_records("call")
    text = "\n".join(JsonFormatter().format(record) for record in records)
    assert "HTTP Request" in text  # the requests were captured
    assert all(secret not in text for secret in SECRETS)


def test_every_serving_route_is_rate_limited_per_key(tmp_path: Path) -> None:
    keys = [f"rate-limited-key-{number}" for number in range(20)]
    lake = start_lake(tmp_path, api_keys=keys, api_rate_per_key=0.01, api_burst_per_key=1)
    with lake, httpx.Client(base_url=lake.server.url) as client:
        guarded = [op for op in operations(client) if op[1] not in OPEN_PATHS]
        for number, (method, path) in enumerate(guarded):
            own = key(keys[number]) if number % 2 else bearer(keys[number])  # a budget each
            assert call(client, method, path, own).status_code == 200, path
            limited = call(client, method, path, own)
            assert limited.status_code == 429, (path, limited.text)
            assert limited.json()["errors"][0]["field"] == "rate"
            assert int(limited.headers["retry-after"]) >= 1


def operations(client: httpx.Client) -> list[tuple[str, str]]:
    """(method, path) of every operation in the API's OpenAPI document."""
    paths = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path) for path, item in paths.items() for method in item]


def call(client: httpx.Client, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    body = {"sql": "SELECT 1"} if method == "POST" else None
    url = path.replace("{view}", PAGEVIEWS.name)
    return client.request(method, url, headers=headers, json=body)


def test_every_serving_route_needs_the_query_scope(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    lake = start_lake(tmp_path, api_keys=KEYS)
    with lake, httpx.Client(base_url=lake.server.url) as client:
        guarded = [op for op in operations(client) if op[1] not in OPEN_PATHS]
        views = {f"/views/{name}" for name in example.views}
        assert {path for _, path in guarded} >= {"/views", "/sql", "/metrics", *views}
        guarded.append(("GET", "/views/nope"))  # an unknown view: 401/403 before 400
        for method, path in guarded:
            for headers, status, field in [
                ({}, 401, "X-API-Key"),
                (key("unknown-key"), 401, "X-API-Key"),
                (bearer("unknown-key"), 401, "Authorization"),
                (key(INGEST), 403, "X-API-Key"),
                (bearer(ADMIN), 403, "Authorization"),
            ]:
                reply = call(client, method, path, headers)
                assert reply.status_code == status, (path, headers, reply.text)
                assert reply.json()["errors"][0]["field"] == field
                if status == 401:
                    assert reply.headers["www-authenticate"] == "Bearer"
            for good in (key(QUERY), bearer(QUERY), key(FULL)):
                reply = call(client, method, path, good)
                assert reply.status_code == (400 if path.endswith("nope") else 200), reply.text
        for path in OPEN_PATHS:
            assert client.get(path).status_code == 200, path
        reply = client.get("/views", headers=key(INGEST))
        assert "'producer' lacks the 'query' scope" in reply.json()["errors"][0]["error"]
    assert_no_key_logged(logs)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[str]:
    """The template's Ingest function behind the gateway, with the keys configured."""
    environment.bind(Settings(home=tmp_path / "home", api_keys=KEYS))
    server = Gateway([LocalFunction(load_template().functions["Ingest"])], "127.0.0.1", 0)
    server.start()
    yield server.url
    server.stop()
    environment.bind(None)


def pageview(event_id: str) -> dict[str, Any]:
    return {"event_id": event_id, "type": "pageview", "ts": now_ms(), "url": "/home",
            "user_id": "u1"}


def test_ingestion_needs_the_ingest_scope(
    gateway: str, logs: pytest.LogCaptureFixture
) -> None:
    events = f"{gateway}/events"
    for headers, status, field in [
        ({}, 401, "X-API-Key"),
        (key("unknown-key"), 401, "X-API-Key"),
        (bearer("unknown-key"), 401, "Authorization"),
        ({"Authorization": f"Basic {INGEST}"}, 401, "Authorization"),
        (key(QUERY), 403, "X-API-Key"),
        (bearer(ADMIN), 403, "Authorization"),
    ]:
        reply = httpx.post(events, json=pageview("refused"), headers=headers)
        assert reply.status_code == status, (headers, reply.text)
        assert reply.json()["accepted"] == 0
        assert reply.json()["rejected"][0]["field"] == field
    for number, good in enumerate((key(INGEST), bearer(INGEST), key(FULL))):
        reply = httpx.post(events, json=pageview(f"ok-{number}"), headers=good)
        assert reply.status_code == 202, reply.text
    assert httpx.get(f"{gateway}/healthz").json() == {"status": "ok"}
    assert_no_key_logged(logs)


def test_the_handler_checks_keys_itself_as_on_aws(tmp_path: Path) -> None:
    """No gateway in front: the handler reads API Gateway's (lower-cased) headers."""
    environment.bind(Settings(home=tmp_path / "home", api_keys=KEYS))
    try:
        event = {"rawPath": "/events", "requestContext": {"http": {"method": "POST"}},
                 "body": json.dumps(pageview("direct"))}
        assert ingest.handler(event, None)["statusCode"] == 401
        for headers, status in ((bearer(QUERY), 403), ({"x-api-key": INGEST}, 202),
                                ({"authorization": f"Bearer {FULL}"}, 202)):
            reply = ingest.handler(event | {"headers": headers}, None)
            assert reply["statusCode"] == status, reply
    finally:
        environment.bind(None)


# ---------------------------------------------------------------- the whole flow


def wait_until(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def ready(flow: Flow) -> bool:
    try:
        return httpx.get(f"{flow.api}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def pageviews(flow: Flow, headers: dict[str, str]) -> int:
    reply = httpx.get(f"{flow.api}/views/{PAGEVIEWS.name}", headers=headers,
                      params={"bucket": "total", "group_by": ""})
    assert reply.status_code == 200, reply.text
    return sum(row["pageviews"] for row in reply.json()["rows"])


def test_up_produces_and_answers_the_cli_with_its_own_keys(tmp_path: Path) -> None:
    """`lambdalake up --produce` and the CLI send the configured keys; the logs hold none."""
    flow = Flow(tmp_path)
    flow.env |= {"LAMBDALAKE_API_KEYS": json.dumps(KEYS[1:])}
    log = tmp_path / "up.log"
    with log.open("w") as stderr:
        flow.process = subprocess.Popen(
            [sys.executable, "-m", "lambdalake.stack.cli", "up", "--produce", "100"], env=flow.env,
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            wait_until(lambda: ready(flow))
            assert httpx.get(f"{flow.api}/views").status_code == 401
            assert httpx.post(flow.gateway, json=pageview("anonymous")).status_code == 401
            wait_until(lambda: pageviews(flow, key(QUERY)) > 0)  # the producer's events
            status = flow.cli("status")
            assert status.returncode == 0 and not status.stderr, status.stderr
            produced = flow.cli("produce", "--count", "10", "--url", flow.gateway)
            assert produced.returncode == 0 and "accepted 10" in produced.stdout
        finally:
            flow.stop()
    text = log.read_text()
    assert "grafana" in text and all(secret not in text for secret in SECRETS)
