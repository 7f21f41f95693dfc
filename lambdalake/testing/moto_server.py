"""moto's server (S3, Kinesis, ... as `lambdalake.testing.moto_kinesis` patches it) in a
process of its own: its CPU and its GIL apart from the process that drives it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from lambdalake.testing import free_port


class MotoServer:
    """`with MotoServer(home) as moto:` serves on `moto.url` until the block ends; its log
    is `home`/moto.log."""

    def __init__(self, home: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(home / "moto.log", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lambdalake.testing.moto_kinesis", "-H", "127.0.0.1",
                 "-p", str(self.port)],
                stdout=subprocess.DEVNULL, stderr=log)

    def __enter__(self) -> MotoServer:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=2)
                return self
            except httpx.TransportError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"moto server did not start on {self.url} in 60 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
