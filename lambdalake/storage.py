"""The object store behind one interface: `file://` (the embedded default) and `s3://`.

Writes are whole-object and atomic: a reader sees the old object or the new one, never a
part. Keys are `/`-separated paths relative to the store's root.

Conditional writes, for what one writer at a time may change (the batch lease, the published
version's pointer): `get_tagged` reads an object with its entity tag; `create` writes one only
if the key is absent (S3 `If-None-Match: *`) and `replace` only if it still has the tag read
(S3 `If-Match`). Both return the new tag, or raise `PreconditionFailed` when another writer
got there first. The file store gives the same guarantees to every process on the machine
(an atomic hard link to create; a replace compares a content hash under a `flock`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:  # imported where Parquet is read: a store's writers never need pyarrow
    import pyarrow.fs as pafs


class NotFound(KeyError):
    pass


class PreconditionFailed(RuntimeError):
    """A conditional write lost: the key exists (`create`) or changed (`replace`)."""

    def __init__(self, key: str):
        super().__init__(f"{key} was written by another writer first")
        self.key = key


class ObjectStore(ABC):
    url: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """The object and its entity tag, for a `replace` conditional on it."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> str:
        """Write `key` only if it does not exist; its new tag. Raises `PreconditionFailed`."""

    @abstractmethod
    def replace(self, key: str, data: bytes, tag: str) -> str:
        """Write `key` only if it still has `tag`; its new tag. Raises `PreconditionFailed`
        (also when the key is gone)."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix`, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def arrow(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the root path inside it, for reading Parquet."""

    def arrow_path(self, key: str) -> str:
        return f"{self.arrow()[1]}/{key}"

    def exists(self, key: str) -> bool:
        try:
            self.get(key)
        except NotFound:
            return False
        return True


class FileStore(ObjectStore):
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._staged(path, data) as tmp:
            os.replace(tmp, path)
        _fsync_dir(path.parent)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(key) from None

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, _tag(data)

    def create(self, key: str, data: bytes) -> str:
        path = self._path(key)
        with self._staged(path, data) as tmp:
            try:
                os.link(tmp, path)  # fails if the key exists, atomically
            except FileExistsError:
                raise PreconditionFailed(key) from None
            Path(tmp).unlink()
        _fsync_dir(path.parent)
        return _tag(data)

    def replace(self, key: str, data: bytes, tag: str) -> str:
        path = self._path(key)
        with self._staged(path, data) as tmp, _locked(path.parent):
            try:
                current = _tag(path.read_bytes())
            except FileNotFoundError:
                raise PreconditionFailed(key) from None
            if current != tag:
                raise PreconditionFailed(key)
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        return _tag(data)

    @contextmanager
    def _staged(self, path: Path, data: bytes) -> Iterator[str]:
        """`data` in a durable temporary file beside `path`, removed if still there after."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            yield tmp
        finally:
            Path(tmp).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        # A prefix of the key, as in S3 ("a/b" matches "a/b.json" and "a/bc/..." too), so the
        # search starts at the folder holding the last, partial part of the prefix.
        if not prefix or prefix.endswith("/"):
            folder = self._path(prefix)
        else:
            folder = self._path(prefix).parent
        if not folder.exists():
            return []
        keys = (
            p.relative_to(self.root).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )
        return sorted(k for k in keys if k.startswith(prefix))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def arrow(self) -> tuple[pafs.FileSystem, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(self.root)


class S3Store(ObjectStore):
    def __init__(self, url: str, endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        self.url, self.bucket, self.prefix = url, parsed.netloc, parsed.path.strip("/")
        self.endpoint_url = endpoint_url
        retries = Config(retries={"max_attempts": 10, "mode": "standard"})
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=retries)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        return self.get_tagged(key)[0]

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            raise NotFound(key) from None
        return reply["Body"].read(), reply["ETag"]

    def create(self, key: str, data: bytes) -> str:
        return self._put_if(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, tag: str) -> str:
        return self._put_if(key, data, IfMatch=tag)

    def _put_if(self, key: str, data: bytes, **condition: str) -> str:
        from botocore.exceptions import ClientError

        try:
            reply = self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, **condition
            )
        except ClientError as exc:
            # 412: the condition is false; 409 (ConditionalRequestConflict): a concurrent
            # conditional write to the key is in flight; 404 (If-Match): the key is gone.
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (404, 409, 412):
                raise PreconditionFailed(key) from None
            raise
        return reply["ETag"]

    def list(self, prefix: str) -> list[str]:
        strip = len(self._key(""))
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix)
        )
        return sorted(obj["Key"][strip:] for page in pages for obj in page.get("Contents", []))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def credentials(self) -> Any:
        """The client's resolved credentials: `access_key`, `secret_key`, `token` (or None)."""
        return self.client._request_signer._credentials.get_frozen_credentials()

    def arrow(self) -> tuple[pafs.FileSystem, str]:
        import pyarrow.fs as pafs

        credentials = self.credentials()
        endpoint = urlparse(self.endpoint_url) if self.endpoint_url else None
        fs = pafs.S3FileSystem(
            access_key=credentials.access_key,
            secret_key=credentials.secret_key,
            session_token=credentials.token,
            region=self.client.meta.region_name or "us-east-1",
            endpoint_override=endpoint.netloc if endpoint else None,
            scheme=endpoint.scheme if endpoint else "https",
        )
        return fs, f"{self.bucket}/{self.prefix}".rstrip("/")


def open_store(url: str, endpoint_url: str | None = None) -> ObjectStore:
    scheme = urlparse(url).scheme
    if scheme == "file":
        return FileStore(Path(urlparse(url).path))
    if scheme == "s3":
        return S3Store(url, endpoint_url)
    raise ValueError(f"store: unsupported URL {url!r}; use file:///path or s3://bucket/prefix")


def _tag(data: bytes) -> str:
    """A content hash, quoted as S3 quotes an ETag."""
    return f'"{hashlib.sha256(data).hexdigest()}"'


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive `flock` on a folder: conditional writes in it, one at a time."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
