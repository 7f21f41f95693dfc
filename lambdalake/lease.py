"""A lease kept in the object store: one holder at a time, across processes and machines.

The lease is one object (the batch layer's is `views/_lease.json`) naming its holder and
when it expires. It is taken by a conditional create, or, once the holder's expiry has
passed, by a replace conditional on the tag read (`ObjectStore.create`, `.replace`): of two
takers exactly one wins. So a holder killed with kill -9 blocks the next one for at most one
lease duration. While held, a heartbeat thread renews the expiry every third of the duration,
conditional on the tag it wrote last; a renewal finding the object changed means the lease
was taken over (the holder stalled past its expiry), and `lost` is set. Releasing replaces
the record with an expired one, conditionally, so the next taker need not wait.

Expiry compares wall clocks: holders on several machines need clocks in step (NTP) to well
within the lease duration.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

from pydantic import BaseModel, ValidationError

from lambdalake.events import iso
from lambdalake.storage import NotFound, ObjectStore, PreconditionFailed

log = logging.getLogger("lambdalake.lease")
ATTEMPTS = 5  # takes lost to other takers before giving up


class Holder(BaseModel):
    owner: str
    host: str
    pid: int
    expires: int  # epoch ms

    def describe(self) -> str:
        return f"{self.owner} (host {self.host}, pid {self.pid}) until {iso(self.expires)}"


class LeaseHeld(RuntimeError):
    """Another holder has the lease; the message names it and until when."""

    def __init__(self, key: str, holder: Holder):
        super().__init__(f"{key} is held by {holder.describe()}")
        self.holder = holder


class Lease:
    """`with Lease(store, key, owner, seconds):` holds the lease for the block, renewed."""

    def __init__(self, store: ObjectStore, key: str, owner: str, seconds: float):
        self.store, self.key, self.owner, self.seconds = store, key, owner, seconds
        self._tag = ""
        self._released = threading.Event()
        self._lost = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease or raise `LeaseHeld`; then keep renewing it until `release`."""
        for _ in range(ATTEMPTS):
            if self._take():
                break
        else:
            raise LeaseHeld(self.key, self._read() or self._record(0))
        log.debug("lease taken", extra={"key": self.key, "owner": self.owner})
        self._heartbeat = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        """Stop renewing; expire the lease unless it was taken over meanwhile."""
        self._released.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self.lost:
            return
        try:
            self.store.replace(self.key, self._record(expires=0).model_dump_json().encode(),
                               self._tag)
        except Exception:  # it expires by itself: a failed release only delays the next taker
            log.warning("releasing the lease failed", exc_info=True, extra={"key": self.key})

    def _take(self) -> bool:
        """True when taken; False when another taker changed the lease meanwhile."""
        record = self._record(self._now() + int(self.seconds * 1000)).model_dump_json().encode()
        try:
            data, tag = self.store.get_tagged(self.key)
        except NotFound:
            return self._written(lambda: self.store.create(self.key, record))
        holder = _parse(data)
        if holder is not None and holder.expires > self._now():
            raise LeaseHeld(self.key, holder)
        if holder is not None and holder.expires:
            log.warning("expired lease taken over", extra={"key": self.key,
                                                           "from": holder.describe()})
        return self._written(lambda: self.store.replace(self.key, record, tag))

    def _written(self, write: Callable[[], str]) -> bool:
        try:
            self._tag = write()
        except PreconditionFailed:
            return False
        return True

    def _renew(self) -> None:
        while not self._released.wait(self.seconds / 3):
            record = self._record(self._now() + int(self.seconds * 1000))
            try:
                self._tag = self.store.replace(self.key, record.model_dump_json().encode(),
                                               self._tag)
            except PreconditionFailed:
                self._lost.set()
                log.error("lease lost: taken over after it expired",
                          extra={"key": self.key, "owner": self.owner})
                return
            except Exception:  # the store is briefly unavailable: the next beat tries again
                log.warning("renewing the lease failed", exc_info=True, extra={"key": self.key})

    def _read(self) -> Holder | None:
        try:
            return _parse(self.store.get(self.key))
        except NotFound:
            return None

    def _record(self, expires: int) -> Holder:
        return Holder(owner=self.owner, host=socket.gethostname(), pid=os.getpid(),
                      expires=expires)

    @staticmethod
    def _now() -> int:
        return time.time_ns() // 1_000_000


def _parse(data: bytes) -> Holder | None:
    """The holder, or None for an unreadable record (taken over as if expired)."""
    try:
        return Holder.model_validate_json(data)
    except ValidationError:
        log.warning("unreadable lease record: taken over")
        return None
