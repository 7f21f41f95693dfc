"""A handler's execution environment: its settings, and what it builds once per cold start.

On AWS Lambda the settings come from the function's environment variables (`LAMBDALAKE_*`,
read by `get_settings`). The local runtime binds its own `Settings` instead, so the handlers
it runs and the runtime around them agree. Resources (validator, bus, store) are built once
per settings object: once per cold start on AWS, again when other settings are bound.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from lambdalake.settings import Settings, get_settings

T = TypeVar("T")
_bound: Settings | None = None


def bind(settings: Settings | None) -> None:
    """Run handlers with `settings` (None: back to the environment variables)."""
    global _bound
    _bound = settings


def current_settings() -> Settings:
    return _bound if _bound is not None else get_settings()


class PerColdStart(Generic[T]):
    """A resource built from the current settings on first use, then reused."""

    def __init__(self, build: Callable[[Settings], T]):
        self._build = build
        self._lock = threading.Lock()
        self._built: tuple[Settings, T] | None = None

    def __call__(self) -> T:
        settings = current_settings()
        with self._lock:
            if self._built is None or self._built[0] is not settings:
                self._built = (settings, self._build(settings))
            return self._built[1]
