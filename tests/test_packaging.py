"""`lambdalake functions package`: artifacts for the AWS Lambda runtime, under its limits, that
import and run their handler in a clean environment (a venv with no site-packages).

The zips are installed from the same manylinux2014 wheels Lambda's python3.11 runtime takes;
the images (no Docker engine here) are laid out as their Dockerfile would lay them out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from lambdalake import master
from lambdalake.auth import KEY_HEADER
from lambdalake.bus import events_topic
from lambdalake.eventlog import now_ms
from lambdalake.functions import cdc
from lambdalake.functions.runtime.template import load_template
from lambdalake.settings import Settings
from lambdalake.stack.package import (
    BASE_IMAGE,
    ENGINES,
    MAX_UNZIPPED_BYTES,
    MAX_ZIPPED_BYTES,
    ZIP_IGNORED_IMPORTS,
    PackageError,
    handler_closure,
    install_image,
    package,
)
from lambdalake.storage import open_store

PROJECT = "lambdalake.example:project"
ROOT = Path(__file__).resolve().parents[1]
# installed dependency sets, kept across runs (pip's cache keeps the wheels)
DEPS = ROOT / "build" / "functions" / ".deps"
KEYS = json.dumps([{"key": "ingest-key", "scopes": ["ingest"]},
                   {"key": "query-key", "scopes": ["query"]}])

# Runs in the clean venv, with the artifact's folder first on sys.path as Lambda's /var/task:
# each line of stdin is [handler path, event]; each line of stdout the handler's answer.
INVOKE = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
for line in sys.stdin:
    path, event = json.loads(line)
    module, _, name = path.rpartition(".")
    print(json.dumps(getattr(importlib.import_module(module), name)(event, None)), flush=True)
"""


def clean_python(tmp_path: Path) -> Path:
    venv = tmp_path / "clean-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv / "bin" / "python"


def invoke(python: Path, task_root: Path, env: dict[str, str],
           calls: list[tuple[str, Any]]) -> list[Any]:
    stdin = "".join(json.dumps(call) + "\n" for call in calls)
    done = subprocess.run([str(python), "-I", "-c", INVOKE, str(task_root)], input=stdin,
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def http_event(body: Any, key: str | None) -> dict[str, Any]:
    headers = {"content-type": "application/json"} | ({KEY_HEADER.lower(): key} if key else {})
    return {"version": "2.0", "routeKey": "POST /events", "rawPath": "/events",
            "headers": headers, "requestContext": {"http": {"method": "POST"}},
            "body": json.dumps(body), "isBase64Encoded": False}


def lambda_env(home: Path) -> dict[str, str]:
    return {"LAMBDALAKE_HOME": str(home), "LAMBDALAKE_API_KEYS": KEYS, "PATH": "/usr/bin"}


def requirement_names(requirements: tuple[str, ...]) -> set[str]:
    return {r.split("<")[0].split(">")[0].split("=")[0] for r in requirements}


def test_a_zip_function_reaching_an_engine_is_refused(tmp_path: Path):
    spec = load_template().functions["Archive"].model_copy(update={"package_type": "Zip"})
    template = load_template().model_copy(update={"functions": {"Archive": spec}})
    with pytest.raises(PackageError, match="imports pyarrow; a zip function must not"):
        package(template, tmp_path, PROJECT)


def test_each_closure_holds_its_handler_and_no_other_part():
    functions = load_template().functions
    ingest = handler_closure(functions["Ingest"], PROJECT)
    assert "lambdalake.functions.ingest" in ingest.modules
    assert "lambdalake.bus" in ingest.modules and "lambdalake.example" in ingest.modules
    assert not any(m.startswith(("lambdalake.batch", "lambdalake.serving", "lambdalake.speed",
                                 "lambdalake.stack", "lambdalake.functions.runtime"))
                   for m in ingest.modules)
    names = requirement_names(ingest.requirements)
    assert {"kafka-python", "pydantic"} <= names and not names & {"pyarrow", "duckdb"}
    nightly = handler_closure(functions["NightlyBatch"], PROJECT)
    assert "lambdalake.batch.run" in nightly.modules
    assert not any(r.startswith(("pyspark", "py4j")) for r in nightly.requirements)


def test_every_zip_function_of_the_template_reaches_no_engine():
    zips = {n: s for n, s in load_template().functions.items() if s.package_type == "Zip"}
    assert {"Ingest", "Authorizer", "IngestQueueFunction", "Cdc"} <= zips.keys()
    for name, spec in zips.items():
        assert not requirement_names(handler_closure(spec, PROJECT).requirements) & {*ENGINES}, name


def test_a_zip_leaves_out_only_what_the_slim_contract_ignores():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [slim] = [c for c in contracts["contracts"] if c["name"].startswith("Ingestion stays slim")]
    assert {tuple(i.split(" -> ")) for i in slim["ignore_imports"]} == ZIP_IGNORED_IMPORTS
    image = load_template().functions["Cdc"].model_copy(update={"package_type": "Image"})
    assert "pyarrow" in requirement_names(handler_closure(image, PROJECT).requirements)


def paid_order(sequence: int, **image: dict[str, str]) -> dict[str, Any]:
    """A DynamoDB Streams record: an order inserted paid."""
    new = {"order_id": {"S": f"o-{sequence}"}, "status": {"S": "paid"}} | image
    return {"eventID": str(sequence), "eventSource": "aws:dynamodb", "eventName": "INSERT",
            "eventVersion": "1.1", "awsRegion": "us-east-1",
            "dynamodb": {"Keys": {"order_id": new["order_id"]}, "NewImage": new,
                         "SequenceNumber": str(sequence), "StreamViewType": "NEW_AND_OLD_IMAGES",
                         "ApproximateCreationDateTime": 1_796_000_000 + sequence}}


def test_zip_functions_fit_lambda_and_run_from_their_zip_in_a_clean_venv(tmp_path: Path):
    artifacts = package(load_template(), tmp_path / "build", PROJECT,
                        ["Ingest", "Authorizer", "Cdc"], DEPS)
    python, home = clean_python(tmp_path), tmp_path / "home"
    for artifact in artifacts:
        assert artifact.zipped_bytes is not None and artifact.zipped_bytes < MAX_ZIPPED_BYTES
        assert artifact.unzipped_bytes < MAX_UNZIPPED_BYTES
        with zipfile.ZipFile(artifact.path) as archive:
            assert sum(i.file_size for i in archive.infolist()) == artifact.unzipped_bytes
            tops = {name.split("/")[0] for name in archive.namelist()}
            archive.extractall(tmp_path / artifact.function)
        assert not tops & {"pyarrow", "duckdb", "pyspark", "fastapi", "faust", "aiohttp",
                           "botocore"}  # the runtime has the AWS SDK
        assert not (tmp_path / artifact.function / "lambdalake" / "batch").exists()

    event = {"event_id": "e1", "type": "pageview", "ts": now_ms(), "url": "/", "user_id": "u"}
    answers = invoke(python, tmp_path / "Ingest", lambda_env(home), [
        ("lambdalake.functions.ingest.handler", http_event({"events": [event, {"x": 1}]},
                                                            "ingest-key")),
        ("lambdalake.functions.ingest.handler", http_event(event, "query-key")),
        ("lambdalake.functions.ingest.handler",  # all valid: the one-call path (jiter)
         http_event({"events": [{**event, "event_id": "e2"}]}, "ingest-key")),
    ])
    assert answers[0]["statusCode"] == answers[2]["statusCode"] == 202
    assert json.loads(answers[0]["body"])["accepted"] == 1
    assert answers[1]["statusCode"] == 403
    logged = [json.loads(r.value) for p in events_topic(Settings(home=home)).partitions
              for r in p.read(0, 100)]
    assert sorted(e["event_id"] for e in logged) == ["e1", "e2"]

    authorized = invoke(python, tmp_path / "Authorizer", lambda_env(home), [
        ("lambdalake.functions.authorizer.handler", {"headers": {"x-api-key": key}})
        for key in ("ingest-key", "query-key", "nope")])
    assert [a["isAuthorized"] for a in authorized] == [True, False, False]
    assert "lacks the 'ingest' scope" in authorized[1]["context"]["reason"]

    # without pyarrow in its zip, the cdc still writes its rejects to the store (its own
    # home: this process holds the embedded log of the first one open)
    order = {"user_id": {"S": "u"}, "sku": {"S": "s"}, "amount": {"N": "4.25"}}
    cdc_home = tmp_path / "cdc-home"
    [captured] = invoke(python, tmp_path / "Cdc", lambda_env(cdc_home), [
        ("lambdalake.functions.cdc.handler", {"Records": [paid_order(1, **order),
                                                          paid_order(2, user_id={"S": "u"})]})])
    assert captured == {"batchItemFailures": []}
    logged = [json.loads(r.value) for p in events_topic(Settings(home=cdc_home)).partitions
              for r in p.read(0, 100)]
    assert [e["event_id"] for e in logged] == ["orders/order_id=o-1/paid"]
    store = open_store(Settings(home=cdc_home).store_url)
    assert store.list(f"{cdc.REJECTS}/") == [f"{cdc.REJECTS}/2.json"]


def kafka_batch(partition: int, offset: int, event: dict[str, Any], arrival: int
                ) -> dict[str, Any]:
    import base64

    record = {"topic": "lambdalake.events", "partition": partition, "offset": offset,
              "timestamp": arrival, "timestampType": "LOG_APPEND_TIME", "key": None,
              "value": base64.b64encode(json.dumps(event).encode()).decode(), "headers": []}
    return {"eventSource": "SelfManagedKafka",
            "records": {f"lambdalake.events-{partition}": [record]}}


@pytest.mark.long
def test_image_functions_install_as_their_dockerfile_says_and_run(tmp_path: Path):
    artifacts = package(load_template(), tmp_path / "build", PROJECT,
                        ["Archive", "NightlyBatch"])
    python, home = clean_python(tmp_path), tmp_path / "home"
    roots = {}
    for artifact in artifacts:
        dockerfile = (artifact.path / "Dockerfile").read_text()
        assert dockerfile.startswith("# Generated") and BASE_IMAGE in dockerfile
        assert "pyspark" not in (artifact.path / "requirements.txt").read_text()
        roots[artifact.function] = tmp_path / f"{artifact.function}-root"
        install_image(artifact.path, roots[artifact.function])

    # per partition an event, then one a while later that moves the watermark past its slice
    old, now = now_ms() - 300_000, now_ms()
    batches = [kafka_batch(p, offset, {"event_id": f"e{offset}{p}", "type": "purchase",
                                       "ts": arrival, "user_id": "u", "sku": "s", "amount": 2.5},
                           arrival)
               for offset, arrival in enumerate([old, now]) for p in range(4)]
    archived = invoke(python, roots["Archive"], lambda_env(home),
                      [("lambdalake.functions.archive.handler", batch) for batch in batches])
    assert [a["archived"] for a in archived] == [1] * 8
    store = open_store(Settings(home=home).store_url)
    rows = [row for key in master.data_keys(store, "purchase")
            for row in pq.read_table(store.arrow_path(key)).to_pylist()]
    assert len(rows) == 8

    scheduled = {"source": "aws.events", "detail-type": "Scheduled Event", "time": "now"}
    [summary] = invoke(python, roots["NightlyBatch"], lambda_env(home),
                       [("lambdalake.functions.nightly.handler", scheduled)])
    assert summary["rows_read"] == 4 and summary["engine"] == "duckdb"
