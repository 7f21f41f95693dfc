"""The deployment files: docker-compose.yml against the Compose specification's schema."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose_schema() -> dict:
    # Located, not imported: check-jsonschema's CLI wants a newer click than faust allows.
    package = Path(find_spec("check_jsonschema").origin).parent
    return json.loads((package / "builtin_schemas/vendor/compose-spec.json").read_text())


def test_compose_file_follows_the_compose_specification() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validate(compose, compose_schema())
    services = set(compose["services"])
    assert {"kafka", "minio", "spark-master", "spark-worker", "lambdalake", "speed"} <= services


def test_compose_schema_rejects_a_broken_file() -> None:
    broken = {"services": {"kafka": {"image": "apache/kafka", "ports": "9092"}}}
    try:
        jsonschema.validate(broken, compose_schema())
    except jsonschema.ValidationError as error:
        assert error.json_path == "$.services.kafka" and "'ports'" in error.message
    else:
        raise AssertionError("a string for ports must not validate")
