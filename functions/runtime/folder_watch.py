"""S3 ObjectCreated for a `file://` landing store: a watched folder.

Every second the folder is listed under the event's key prefix. A file whose size and
modification time are the same on two listings in a row (written whole) and that was not
delivered in that state yet is delivered as an S3 ObjectCreated event of its key. A failed
invocation is retried on the next listing. At start every file is offered once more: the
landing function recognises what it imported (by content) and publishes nothing again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

from lambdalake.events import iso
from lambdalake.functions.runtime.context import REGION
from lambdalake.functions.runtime.function import FunctionError, LocalFunction, Throttled
from lambdalake.functions.runtime.polling import Polling
from lambdalake.functions.runtime.template import BucketSource
from lambdalake.loops import Loops

log = logging.getLogger("lambdalake.functions.folder_watch")

Signature = tuple[int, int]  # (size, mtime_ns)


def s3_put_event(bucket: str, key: str, size: int) -> dict[str, Any]:
    """The S3 ObjectCreated:Put notification of one object."""
    return {"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": REGION,
        "eventTime": iso(int(time.time() * 1000)),
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "local"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "lambdalake-folder-watch",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "local"},
                       "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": quote_plus(key, safe="/"), "size": size, "sequencer": ""},
        },
    }]}


class FolderWatch(Polling):
    def __init__(self, function: LocalFunction, source: BucketSource, root: Path,
                 poll_seconds: float = 1.0, loops: Loops | None = None):
        self.function, self.source, self.root = function, source, root
        self._seen: dict[str, Signature] = {}
        self._delivered: dict[str, Signature] = {}
        self.idle_seconds = poll_seconds
        super().__init__(f"folder-{function.name}", loops, backoff_seconds=1.0)

    def start(self) -> None:
        (self.root / self.source.prefix).mkdir(parents=True, exist_ok=True)  # where to drop
        super().start()

    def poll_once(self) -> int:
        return len(self.scan())

    def scan(self) -> list[str]:
        """Deliver the files written whole since the last scan; their keys."""
        listed = self._listing()
        stable = [key for key, signature in listed.items()
                  if self._seen.get(key) == signature != self._delivered.get(key)]
        self._seen = listed
        return [key for key in sorted(stable) if self._deliver(key, listed[key])]

    def _listing(self) -> dict[str, Signature]:
        found = {}
        for path in self.root.glob("**/*"):
            key = path.relative_to(self.root).as_posix()
            # dot files: being written (`.part`, editors' swap files)
            if (key.startswith(self.source.prefix) and not path.name.startswith(".")
                    and path.is_file()):
                info = path.stat()
                found[key] = (info.st_size, info.st_mtime_ns)
        return found

    def _deliver(self, key: str, signature: Signature) -> bool:
        try:
            self.function.invoke(s3_put_event(self.root.name, key, signature[0]))
        except (FunctionError, Throttled) as error:
            log.warning("landed file not imported; retried", extra={
                "function": self.function.name, "key": key, "error": str(error)})
            return False
        self._delivered[key] = signature
        return True
