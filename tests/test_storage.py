"""FileStore and S3Store (against a real S3 API, moto's server) behave the same."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lambdalake.storage import (
    FileStore,
    NotFound,
    ObjectStore,
    PreconditionFailed,
    S3Store,
    open_store,
)


def new_bucket(endpoint: str) -> str:
    name = f"lake-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["file", "s3", "s3-root"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "file":
        return FileStore(tmp_path / "lake")
    endpoint = request.getfixturevalue("s3_server")
    bucket = new_bucket(endpoint)
    prefix = "" if request.param == "s3-root" else "/deployments/test"
    return S3Store(f"s3://{bucket}{prefix}", endpoint_url=endpoint)


KEYS = {
    "master/type=pageview/p=0/00-09.parquet": b"pageviews 0-9",
    "master/type=pageview/p=1/00-04.parquet": b"pageviews 0-4",
    "master/type=purchase/p=0/00-09.parquet": b"purchases",
    "master/_watermarks/p=0.json": b'{"next_offset": 10}',
    "views/_current.json": b'{"version": "v2"}',
    "views/x/ab/1": b"1",
    "views/x/abc/2": b"2",
    "views/x/ab.json": b"3",
    "top": b"",
}


def fill(store: ObjectStore) -> None:
    for key, data in KEYS.items():
        store.put(key, data)


def test_put_get_round_trip_and_overwrite(store):
    fill(store)
    for key, data in KEYS.items():
        assert store.get(key) == data
    store.put("views/_current.json", b'{"version": "v3"}')
    assert store.get("views/_current.json") == b'{"version": "v3"}'
    blob = os.urandom(3 * 1024 * 1024 + 17)
    store.put("big/blob.bin", blob)
    assert store.get("big/blob.bin") == blob


def test_missing_keys_raise_not_found(store):
    fill(store)
    for key in ("nope", "master/type=pageview", "master/type=pageview/p=0/"):
        with pytest.raises(NotFound):
            store.get(key)
        assert not store.exists(key)
    assert issubclass(NotFound, KeyError)
    assert store.exists("master/_watermarks/p=0.json")
    assert store.exists("top")  # an empty object exists


def test_list_by_prefix_sorted(store):
    fill(store)
    assert store.list("") == sorted(KEYS)
    assert store.list("master/type=pageview/") == [
        "master/type=pageview/p=0/00-09.parquet",
        "master/type=pageview/p=1/00-04.parquet",
    ]
    assert store.list("master/type=p") == sorted(k for k in KEYS if k.startswith("master/type=p"))
    assert store.list("views/x/ab/") == ["views/x/ab/1"]
    # A prefix is a prefix of the key, not a folder: "views/x/ab" also matches ab.json, abc/.
    assert store.list("views/x/ab") == ["views/x/ab.json", "views/x/ab/1", "views/x/abc/2"]
    assert store.list("views/_current.json") == ["views/_current.json"]
    assert store.list("nothing/here/") == []
    assert store.list("nothing") == []


def test_delete(store):
    fill(store)
    store.delete("views/x/ab/1")
    store.delete("views/x/ab/1")  # deleting what is gone is no error
    store.delete("never/existed")
    with pytest.raises(NotFound):
        store.get("views/x/ab/1")
    assert store.list("views/x/") == ["views/x/ab.json", "views/x/abc/2"]
    for key in list(KEYS):
        store.delete(key)
    assert store.list("") == []


def test_puts_leave_no_temporary_objects(store):
    for i in range(20):
        store.put(f"runs/{i:02d}.json", b"{}" * i)
    assert store.list("") == [f"runs/{i:02d}.json" for i in range(20)]
    assert store.list("runs/") == store.list("")


def test_file_store_put_is_atomic(tmp_path):
    """Readers see the old object or the new one, never a part; a failed put leaves nothing."""
    store = FileStore(tmp_path)
    old, new = b"o" * 4_000_000, b"n" * 4_000_000
    store.put("views/_current.json", old)
    stop = threading.Event()
    seen: set[bytes] = set()

    def read():
        while not stop.is_set():
            data = store.get("views/_current.json")
            seen.add(data[:1] + data[-1:] + str(len(data)).encode())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            store.put("views/_current.json", new if i % 2 else old)
    finally:
        stop.set()
        reader.join()
    assert seen <= {b"oo4000000", b"nn4000000"}
    with pytest.raises(TypeError):
        store.put("views/broken.json", "not bytes")  # type: ignore[arg-type]
    assert store.list("") == ["views/_current.json"]
    on_disk = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    assert on_disk == ["views/_current.json"]


def test_file_store_list_hides_a_put_in_progress(tmp_path):
    store = FileStore(tmp_path)
    store.put("a/b.json", b"1")
    (tmp_path / "a" / ".tmp-abc123").write_bytes(b"half")  # another process mid-put
    assert store.list("") == ["a/b.json"]
    assert store.list("a/") == ["a/b.json"]


def test_parquet_written_with_put_reads_back_through_arrow(store):
    table = pa.table({"event_id": ["a", "b", "c"], "ts": pa.array([1, 2, 3], pa.int64()),
                      "amount": [1.5, None, 3.25]})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    key = "master/type=purchase/p=0/00000000000000000000-00000000000000000002.parquet"
    store.put(key, sink.getvalue())
    fs, root = store.arrow()
    assert store.arrow_path(key) == f"{root}/{key}"
    back = pq.read_table(store.arrow_path(key), filesystem=fs)
    assert back.equals(table)
    assert pq.read_table(f"{root}/master", filesystem=fs).num_rows == 3


def test_open_store_by_url(tmp_path, s3_server):
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, FileStore)
    assert local.root == tmp_path.resolve()
    bucket = new_bucket(s3_server)
    remote = open_store(f"s3://{bucket}/lake", endpoint_url=s3_server)
    assert isinstance(remote, S3Store)
    assert (remote.bucket, remote.prefix) == (bucket, "lake")
    remote.put("k", b"v")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    assert s3.get_object(Bucket=bucket, Key="lake/k")["Body"].read() == b"v"
    with pytest.raises(ValueError, match="unsupported URL"):
        open_store("ftp://example.org/lake")
    assert Path(local.arrow()[1]) == tmp_path.resolve()


# -- conditional writes ------------------------------------------------------------------


def test_create_only_if_absent_and_replace_only_if_unchanged(store):
    tag = store.create("views/_lease.json", b"first")
    assert store.get_tagged("views/_lease.json") == (b"first", tag)
    with pytest.raises(PreconditionFailed):
        store.create("views/_lease.json", b"second")
    newer = store.replace("views/_lease.json", b"second", tag)
    assert store.get_tagged("views/_lease.json") == (b"second", newer) and newer != tag
    with pytest.raises(PreconditionFailed):
        store.replace("views/_lease.json", b"third", tag)  # the tag read before the change
    store.put("views/_lease.json", b"overwritten")
    with pytest.raises(PreconditionFailed):
        store.replace("views/_lease.json", b"third", newer)
    assert store.get("views/_lease.json") == b"overwritten"
    with pytest.raises(PreconditionFailed):
        store.replace("views/missing.json", b"x", newer)
    assert not store.exists("views/missing.json")
    assert store.list("views/") == ["views/_lease.json"]  # no temporary objects left
    with pytest.raises(NotFound):
        store.get_tagged("views/missing.json")


CONTENDER = """
import sys
from pathlib import Path
from lambdalake.storage import FileStore, PreconditionFailed
store, how, me = FileStore(Path(sys.argv[1])), sys.argv[2], sys.argv[3].encode()
tag = store.get_tagged("k")[1] if how == "replace" else None
print("ready", flush=True)
sys.stdin.readline()
try:
    store.create("k", me) if how == "create" else store.replace("k", me, tag)
    print("won")
except PreconditionFailed:
    print("lost")
"""


@pytest.mark.parametrize("how", ["create", "replace"])
def test_file_store_conditional_writes_have_one_winner_among_processes(tmp_path, how):
    """Eight processes write the same key at once, each conditional on the state it read:
    exactly one wins, and the object is the winner's."""
    store = FileStore(tmp_path)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    for round_ in range(3):
        store.delete("k")
        if how == "replace":
            store.put("k", b"before")
        procs = [
            subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path), how, f"p{i}"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
            for i in range(8)
        ]
        assert all(p.stdout.readline() == "ready\n" for p in procs)
        for p in procs:  # every one has read the state; now all go
            p.stdin.write("go\n")
            p.stdin.flush()
        outcomes = [p.communicate(timeout=60)[0].strip() for p in procs]
        assert sorted(outcomes) == ["lost"] * 7 + ["won"], round_
        assert store.get("k") == f"p{outcomes.index('won')}".encode()


def contend(store: ObjectStore, start: threading.Barrier, data: bytes, tag: str | None) -> bool:
    start.wait()
    try:
        store.create("k", data) if tag is None else store.replace("k", data, tag)
    except PreconditionFailed:
        return False
    return True


@pytest.mark.parametrize("how", ["create", "replace"])
def test_file_store_conditional_writes_have_one_winner_among_threads(tmp_path, how):
    store = FileStore(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        for _ in range(20):
            store.delete("k")
            tag = store.create("k", b"before") if how == "replace" else None
            start = threading.Barrier(8)
            won = list(pool.map(lambda i, s=start, t=tag: contend(store, s, b"%d" % i, t),
                                range(8)))
            assert won.count(True) == 1 and store.get("k") == b"%d" % won.index(True)
