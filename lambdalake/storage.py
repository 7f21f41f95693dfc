"""The object store behind one interface: `file://` (the embedded default) and `s3://`.

Writes are whole-object and atomic: a reader sees the old object or the new one, never a
part. Keys are `/`-separated paths relative to the store's root.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


class NotFound(KeyError):
    pass


class ObjectStore(ABC):
    url: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(key) from None

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
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            raise NotFound(key) from None
        return reply["Body"].read()

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
