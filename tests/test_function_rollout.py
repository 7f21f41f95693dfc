"""Versions, safe roll-out and metering of the functions, as AWS Lambda has them.

`lambdalake functions deploy` publishes numbered versions behind the `live` alias and shifts
traffic by weight; the local runtime routes real requests by those weights; a rollback
restores the previous version. Metering bills as the cloud does: checked as arithmetic, then
on the metrics of a real run, read back by `lambdalake functions stats`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY, generate_latest

from lambdalake.functions.runtime.function import FunctionError, LocalFunction
from lambdalake.functions.runtime.local import LocalRuntime
from lambdalake.functions.runtime.metering import Prices, Usage, billed_ms, gb_seconds
from lambdalake.functions.runtime.template import FunctionSpec
from lambdalake.functions.runtime.versions import FunctionVersions, VersionError, read_code
from lambdalake.settings import Settings

BIN = Path(sys.executable).parent
INGEST = "lambdalake.functions.ingest.handler"


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN / "lambdalake", *args], capture_output=True, text=True,
                          env=os.environ | {"LAMBDALAKE_HOME": str(home), "COLUMNS": "200"},
                          cwd=home, timeout=60)


def code_answering(version: str) -> bytes:
    return (f"def handler(event, context):\n"
            f"    return {{'code': {version!r}, 'version': context.function_version,\n"
            f"            'arn': context.invoked_function_arn}}\n").encode()


def shares(function: LocalFunction, invocations: int) -> Counter[str]:
    return Counter(function.invoke({})["code"] for _ in range(invocations))


@pytest.fixture
def versioned(tmp_path: Path) -> tuple[LocalFunction, FunctionVersions]:
    versions = FunctionVersions(tmp_path / "functions", "Echo", "tests.echo.handler")
    return LocalFunction(FunctionSpec(name="Echo", handler="tests.echo.handler"),
                         versions=versions), versions


# ---------------------------------------------------------------- versions and the alias


def test_a_canary_routes_its_weight_and_a_rollback_restores_the_previous_version(
    versioned: tuple[LocalFunction, FunctionVersions],
):
    function, versions = versioned
    assert versions.deploy(code_answering("one")).version == 1
    arn = "arn:aws:lambda:us-east-1:123456789012:function:Echo:live"
    assert function.invoke({}) == {"code": "one", "version": "1", "arn": arn}

    canary = versions.deploy(code_answering("two"), canary=0.2)
    assert (canary.version, canary.additional, canary.weight) == (1, 2, 0.2)
    # 2000 draws of p = 0.2: within 5 standard deviations (17.9) of 400
    assert abs(shares(function, 2000)["two"] - 400) < 90
    versions.shift(0.5)
    assert abs(shares(function, 2000)["two"] - 1000) < 112

    versions.rollback()  # the deployment stops: everything back on version 1
    assert shares(function, 300) == {"one": 300}
    assert versions.deploy(code_answering("two")).version == 2  # same code: no new version
    assert shares(function, 50) == {"two": 50}
    versions.rollback()  # version 2 was live: back to version 1
    assert shares(function, 50) == {"one": 50}
    assert versions.numbers() == [1, 2]


def test_versions_refuse_what_cannot_be(versioned: tuple[LocalFunction, FunctionVersions],
                                        tmp_path: Path):
    function, versions = versioned
    with pytest.raises(VersionError, match="never deployed"):
        versions.rollback()
    versions.deploy(code_answering("one"))
    with pytest.raises(VersionError, match="no deployment under way"):
        versions.shift(0.5)
    with pytest.raises(VersionError, match="version 1 is the first"):
        versions.rollback()
    with pytest.raises(VersionError, match="holds no tests/echo.py"):
        read_code("tests.echo.handler", tmp_path)
    versions.deploy(b"def handler(event, context):\n    raise ValueError('broken')\n")
    with pytest.raises(FunctionError, match="ValueError: broken"):
        function.invoke({})


def test_the_cli_deploys_a_canary_the_runtime_routes_real_requests_and_rolls_back(
    tmp_path: Path,
):
    home = tmp_path / "home"
    home.mkdir()
    marked = tmp_path / "v2" / "lambdalake" / "functions"
    marked.mkdir(parents=True)
    source = read_code(INGEST, None).decode()
    (marked / "ingest.py").write_text(source.replace(
        '"headers": {"content-type": "application/json",',
        '"headers": {"content-type": "application/json", "x-code": "two",'))
    assert "x-code" in (marked / "ingest.py").read_text()

    assert "live -> version 1" in cli("functions", "deploy", "Ingest", home=home).stdout
    done = cli("functions", "deploy", "Ingest", "--code", str(tmp_path / "v2"),
               "--canary", "0.3", home=home)
    assert "version 1 (70%), version 2 (30%)" in done.stdout, done.stderr

    settings = Settings(home=home, gateway_port=0)
    with LocalRuntime(settings) as runtime:
        url = f"{runtime.gateway.url}/events"

        def codes(requests: int) -> Counter[str]:
            with httpx.Client() as client:
                return Counter(client.post(url, json={"x": 1}).headers.get("x-code", "one")
                               for _ in range(requests))

        # 200 draws of p = 0.3: within 5 standard deviations (6.5) of 60
        assert abs(codes(200)["two"] - 60) < 33
        assert "live -> version 1" in cli("functions", "rollback", "Ingest", home=home).stdout
        assert codes(50) == {"one": 50}
    failed = cli("functions", "shift", "Ingest", "0.5", home=home)
    assert failed.returncode == 1 and "no deployment under way" in failed.stderr


# ---------------------------------------------------------------- metering


@given(st.floats(min_value=0, max_value=900_000, allow_nan=False))
def test_billed_duration_is_rounded_up_to_the_millisecond(duration_ms: float):
    billed = billed_ms(duration_ms)
    assert isinstance(billed, int) and billed >= 1
    assert billed - 1 < duration_ms + 1e-6 and duration_ms <= billed + 1e-6


def test_the_bill_of_a_known_workload():
    assert billed_ms(0.2) == 1 and billed_ms(10.0) == 10 and billed_ms(10.01) == 11
    assert gb_seconds(11, 1024) == pytest.approx(0.011)
    # AWS's own example: 1M invocations of 128 MB, 100 ms each
    usage = Usage("F", memory_mb=128, invocations=1_000_000,
                  gb_seconds=1_000_000 * gb_seconds(100, 128))
    assert usage.gb_seconds == pytest.approx(12_500)
    assert usage.cost(Prices()) == pytest.approx(12_500 * 0.0000166667 + 0.20)
    assert usage.cost(Prices(per_gb_second=0.0, per_million_requests=1.0)) == 1.0


@pytest.fixture
def metrics_url() -> Iterator[str]:
    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = generate_latest(REGISTRY)
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()


def test_stats_of_a_real_run_show_what_the_cloud_would_bill(tmp_path: Path, metrics_url: str):
    started, release = threading.Event(), threading.Event()

    def work(event: dict[str, Any], context: Any) -> int:
        if event.get("hold"):
            started.set()
            release.wait(10)
        if event.get("fail"):
            raise ValueError("failed")
        return 1

    spec = FunctionSpec(name="Metered", handler="tests.metered.handler", MemorySize=2048,
                        ReservedConcurrentExecutions=2)
    function = LocalFunction(spec, work)
    held = threading.Thread(target=function.invoke, args=({"hold": True},))
    held.start()
    assert started.wait(10)
    for _ in range(5):
        function.invoke({})
    release.set()
    held.join()
    with pytest.raises(FunctionError):
        function.invoke({"fail": True})

    done = cli("functions", "stats", "--url", metrics_url, "--json", home=tmp_path)
    [usage] = [u for u in json.loads(done.stdout) if u["function"] == "Metered"]
    assert (usage["invocations"], usage["errors"], usage["throttles"]) == (7, 1, 0)
    assert (usage["cold_starts"], usage["concurrent_max"], usage["memory_mb"]) == (2, 2, 2048)
    # each invocation billed whole milliseconds (of init and duration), at least one
    billed_ms_total = usage["billed_duration_s"] * 1000
    assert billed_ms_total == pytest.approx(round(billed_ms_total)) and billed_ms_total >= 7
    assert billed_ms_total >= (usage["duration_s"] + usage["init_duration_s"]) * 1000
    assert usage["gb_seconds"] == pytest.approx(usage["billed_duration_s"] * 2)
    expected = 7 / 1e6 * 0.20 + usage["gb_seconds"] * 0.0000166667
    assert usage["cost_usd"] == pytest.approx(expected)
    assert math.isclose(usage["duration_s"], usage["duration_s"])  # a number, never NaN

    table = cli("functions", "stats", "--url", metrics_url, home=tmp_path).stdout
    assert "Metered" in table and "cost USD" in table, table
