"""The deployment files: docker-compose.yml against the Compose specification's schema, and
the SAM template through cfn-lint and `sam validate --lint`, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib.util import find_spec
from pathlib import Path

import jsonschema
import pytest
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


# ---------------------------------------------------------------- the SAM template

TEMPLATE = ROOT / "template.yaml"  # the root's symlink to functions/template.yaml, as SAM reads it


def sam_document() -> dict:
    from lambdalake.functions.runtime.template import _CloudFormationLoader

    return yaml.load(TEMPLATE.read_text(), Loader=_CloudFormationLoader)


def sam_command() -> str | None:
    """SAM CLI, kept in its own venv (`make` installs it: it pins a click import-linter
    refuses), or on PATH."""
    local = ROOT / ".venv-sam" / "bin" / "sam"
    return str(local) if local.exists() else shutil.which("sam")


def test_the_template_passes_cfn_lint() -> None:
    from cfnlint.api import ManualArgs, lint_file

    matches = lint_file(TEMPLATE, config=ManualArgs(regions=["us-east-1"]))
    assert [str(match) for match in matches] == []


def test_cfn_lint_catches_a_broken_template(tmp_path: Path) -> None:
    from cfnlint.api import ManualArgs, lint_file

    broken = tmp_path / "template.yaml"
    broken.write_text(TEMPLATE.read_text().replace("MemorySize: 256", "MemorySize: 99999"))
    assert any("99999" in str(m) for m in lint_file(broken, config=ManualArgs()))


def test_the_template_passes_sam_validate_lint_offline() -> None:
    sam = sam_command()
    if sam is None:
        pytest.skip("SAM CLI not installed (make installs it in .venv-sam)")
    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1", "SAM_CLI_TELEMETRY": "0",
           "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    done = subprocess.run([sam, "validate", "--lint", "-t", str(TEMPLATE)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is a valid SAM Template" in done.stdout + done.stderr


def test_every_function_rolls_out_on_its_live_alias_and_rolls_back_on_its_alarms() -> None:
    document = sam_document()
    resources = document["Resources"]
    defaults = document["Globals"]["Function"]
    assert defaults["AutoPublishAlias"] == "live" and "DeploymentPreference" in defaults
    functions = {n: r for n, r in resources.items() if r["Type"] == "AWS::Serverless::Function"}
    assert {"Ingest", "Archive", "NightlyBatch", "Authorizer"} <= functions.keys()
    for name, function in functions.items():
        alarms = [resources[a["Ref"]]["Properties"]
                  for a in function["Properties"]["DeploymentPreference"]["Alarms"]]
        assert sorted(a["MetricName"] for a in alarms) == ["Errors", "Throttles"], name
        for alarm in alarms:
            assert {"Name": "FunctionName", "Value": {"Ref": name}} in alarm["Dimensions"]
        if function["Properties"].get("PackageType") == "Image":
            assert function["Metadata"]["DockerContext"] == f"build/functions/{name}"
        else:
            assert function["Properties"]["CodeUri"] == f"build/functions/{name}.zip"


def test_http_ingestion_is_behind_the_api_key_authorizer_and_the_bus_is_a_choice() -> None:
    document = sam_document()
    api = document["Resources"]["IngestApi"]["Properties"]["Auth"]
    authorizer = api["Authorizers"][api["DefaultAuthorizer"]]
    assert authorizer["FunctionArn"] == {"Fn::GetAtt": "Authorizer.Arn"}
    assert document["Parameters"]["Bus"]["AllowedValues"] == ["kafka", "kinesis"]
    assert {"UseKafka", "UseKinesis", "InVpc"} <= document["Conditions"].keys()
    assert {"SubnetIds", "SecurityGroupIds", "KafkaSecretArn"} <= document["Parameters"].keys()
