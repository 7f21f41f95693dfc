"""Structured logs: one JSON object a line, with the `extra` fields of each call."""

from __future__ import annotations

import json
import logging
import sys

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry |= {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted: a progress display that
    redirects stderr then prints each log line above its bars instead of over them."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(level: str = "INFO", everything: bool = False) -> None:
    """JSON lines on stderr for lambdalake's loggers, or for every library's too."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger(None if everything else "lambdalake")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
