"""One function as AWS Lambda runs it: handler, concurrency limit, environments, timeout.

An invocation takes a concurrency slot (none free: `Throttled`) and a warm environment (none
idle: a cold start), then runs the handler in that environment's thread with a
`LambdaContext`. Past its timeout it is reported as `FunctionTimeout` and its environment is
discarded, so the next invocation starts cold; its thread cannot be killed and runs on,
detached, and ends once the handler returns.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from functools import cache
from typing import Any

from lambdalake.functions.runtime.context import LambdaContext
from lambdalake.functions.runtime.metrics import FunctionMetrics
from lambdalake.functions.runtime.template import FunctionSpec
from lambdalake.functions.runtime.versions import ALIAS, FunctionVersions

Handler = Callable[[Any, LambdaContext], Any]


class Throttled(Exception):
    """Every slot of the function's reserved concurrency is in use."""


class FunctionError(Exception):
    """The handler raised (its exception is the `__cause__`) or did not finish in time."""


class FunctionTimeout(FunctionError):
    pass


class _Environment:
    """An execution environment: a thread that runs the invocations handed to it, one at a
    time, and waits warm between them. A thread started per invocation cost the start and,
    while other threads held the GIL, milliseconds of waiting for it."""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def run(self, call: Callable[[], None]) -> None:
        self._calls.put(call)

    def discard(self) -> None:
        """Its thread ends once what it runs (past its timeout) returns."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            call()


@cache
def freeze_what_init_built() -> None:
    """Once a process's first environment has started (modules, clients and validators
    built, 70,000 objects for Ingest), what is alive is frozen out of the cyclic GC: a busy
    function's requests keep enough objects alive to trigger a full collection every ~20,000
    events, which walked all of it each time (2.5 us of CPU an event). The garbage is
    collected first, and at exit the final collection sees everything again (extensions
    report the objects it never frees)."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)


class LocalFunction:
    def __init__(self, spec: FunctionSpec, handler: Handler | None = None,
                 versions: FunctionVersions | None = None):
        """`versions`: the function's published versions; once it is deployed, each
        invocation runs the version its `live` alias routes it to."""
        self.spec, self.name = spec, spec.name
        self._handler, self.versions = handler, versions
        limit = spec.reserved_concurrency
        self._slots = None if limit is None else threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._idle: list[_Environment] = []  # warm environments waiting for an invocation
        self.metrics = FunctionMetrics(spec.name, spec.memory_mb)

    def handler(self) -> Handler:
        if self._handler is None:
            module, _, attribute = self.spec.handler.rpartition(".")
            self._handler = getattr(importlib.import_module(module), attribute)
        return self._handler

    def invoke(self, event: Any) -> Any:
        """Run the handler on `event`; its result, or `Throttled` / `FunctionError`."""
        if self._slots is not None and not self._slots.acquire(blocking=False):
            self.metrics.throttled()
            raise Throttled(f"{self.name}: all {self.spec.reserved_concurrency} slots in use")
        try:
            return self._in_environment(event)
        finally:
            if self._slots is not None:
                self._slots.release()

    def _in_environment(self, event: Any) -> Any:
        with self._lock:
            warm = self._idle.pop() if self._idle else None
        self.metrics.started()
        init_s, started = 0.0, time.perf_counter()
        environment = warm or _Environment(self.name)
        try:
            version, handler = self._load()  # a new environment's init: its module loaded
            if warm is None:
                init_s, started = time.perf_counter() - started, time.perf_counter()
            result = self._run(environment, version, handler, event)
        except FunctionError as error:
            self._finish(environment, started, warm is None, init_s, error)
            raise
        self._finish(environment, started, warm is None, init_s, None)
        return result

    def _load(self) -> tuple[str, Handler]:
        """The version an invocation runs (by the alias's weights), and its handler."""
        try:
            alias = self.versions.alias() if self.versions is not None else None
            if alias is None or self.versions is None:
                return "$LATEST", self.handler()
            number = alias.pick(random.random())
            return str(number), self.versions.handler(number)
        except Exception as exc:  # as on AWS: an init error fails the invocation
            raise FunctionError(f"{self.name}: init failed: {type(exc).__name__}: {exc}") from exc

    def _finish(self, environment: _Environment, started: float, cold: bool, init_s: float,
                error: FunctionError | None) -> None:
        self.metrics.invoked(time.perf_counter() - started, cold, error is not None, init_s)
        if cold:
            freeze_what_init_built()
        if isinstance(error, FunctionTimeout):
            environment.discard()
            return
        with self._lock:
            self._idle.append(environment)

    def _run(self, environment: _Environment, version: str, handler: Handler,
             event: Any) -> Any:
        spec = self.spec
        alias = None if version == "$LATEST" else ALIAS
        context = LambdaContext.start(spec.name, spec.memory_mb, spec.timeout_seconds,
                                      version, alias)
        self.metrics.ran(version)
        future: Future[Any] = Future()

        def work() -> None:
            try:
                future.set_result(handler(event, context))
            except BaseException as exc:  # delivered to the invoker, whatever it is
                future.set_exception(exc)

        environment.run(work)
        if not wait([future], timeout=spec.timeout_seconds).done:
            raise FunctionTimeout(f"{spec.name}: request {context.aws_request_id} "
                                  f"timed out after {spec.timeout_seconds} s")
        try:
            return future.result()
        except BaseException as exc:
            raise FunctionError(f"{spec.name}: {type(exc).__name__}: {exc}") from exc
