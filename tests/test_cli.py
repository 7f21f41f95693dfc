"""The `lambdalake` command as a user meets it: one line per error, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lambdalake.testing import free_port

BIN = Path(sys.executable).parent


def cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = os.environ | {"LAMBDALAKE_HOME": str(home)} | env
    return subprocess.run([BIN / "lambdalake", *args], capture_output=True, text=True,
                          env=environment, cwd=home, timeout=60)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_version(tmp_path: Path) -> None:
    done = cli("--version", home=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("lambdalake ")


@pytest.mark.parametrize("project", ["no_such_module:project", "json:loads", "lambdalake.views"])
def test_an_unloadable_project_is_one_line(tmp_path: Path, project: str) -> None:
    line = one_line_error(cli("batch", "run", home=tmp_path, LAMBDALAKE_PROJECT=project))
    assert project in line


def test_a_dead_gateway_fails_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    url = f"http://127.0.0.1:{free_port()}/events"
    line = one_line_error(cli("produce", "--url", url, "--count", "10", home=tmp_path))
    assert "not reachable" in line and url in line
    assert time.monotonic() - started < 10


def test_a_dead_api_fails_fast(tmp_path: Path) -> None:
    line = one_line_error(cli("status", home=tmp_path, LAMBDALAKE_API_PORT=str(free_port())))
    assert "not reachable" in line


def test_a_bad_log_level_names_the_choices(tmp_path: Path) -> None:
    line = one_line_error(cli("--log-level", "loud", "batch", "history", home=tmp_path))
    assert "debug, info, warning, error" in line


def test_history_as_json(tmp_path: Path) -> None:
    done = cli("batch", "history", "--json", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_a_bad_setting_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(cli("batch", "history", home=tmp_path, LAMBDALAKE_PARTITIONS="zero"))
    assert "partitions" in line


@pytest.mark.long  # the Kafka client gives up on bootstrapping after 30 s
def test_serve_without_kafka_is_one_line(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    line = one_line_error(cli("serve", "--bootstrap", bootstrap, "--port", "0", home=tmp_path))
    assert f"cannot reach Kafka at {bootstrap}" in line


def test_a_speed_worker_needs_a_bus_of_its_own(tmp_path: Path) -> None:
    line = one_line_error(cli("speed", home=tmp_path, LAMBDALAKE_BUS="embedded"))
    assert "LAMBDALAKE_BUS=kafka or kinesis" in line
