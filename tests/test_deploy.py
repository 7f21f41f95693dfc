"""The deployment files. docker-compose.yml against the Compose specification's schema and
against the CLI; then every lambdalake service of it run locally from the installed wheel, with
the environment compose gives it (only hostnames and listening ports mapped to the test's
services), and the acceptance flow through them: events in, answers equal to a recompute. The
SAM template through cfn-lint and `sam validate --lint`, offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import boto3
import httpx
import jsonschema
import pytest
import yaml
from compose import ROOT, compose, lambdalake_services, parse_cli
from test_flow import recompute
from test_wheel import installed, installed_with_spark  # noqa: F401  (fixtures)

from lambdalake.auth import KEY_HEADER
from lambdalake.eventlog import now_ms
from lambdalake.producer import ProduceStats, send_batch
from lambdalake.settings import Settings
from lambdalake.stack.alarms import BEGIN, with_alarms
from lambdalake.stack.up import ROLES
from lambdalake.synthetic import WebAnalyticsStream
from lambdalake.testing import free_port

VARIABLES = {"MINIO_ROOT_PASSWORD": "testing"}  # the one variable compose requires


def compose_schema() -> dict:
    # Located, not imported: check-jsonschema's CLI wants a newer click than faust allows.
    package = Path(find_spec("check_jsonschema").origin).parent
    return json.loads((package / "builtin_schemas/vendor/compose-spec.json").read_text())


def test_compose_file_follows_the_compose_specification() -> None:
    spec = compose(VARIABLES)
    jsonschema.validate(spec, compose_schema())
    assert {"kafka-1", "kafka-2", "kafka-3", "minio", "create-buckets", "spark-master",
            "spark-worker", "functions", "speed", "serving", "scheduler"} <= set(spec["services"])


def test_compose_schema_rejects_a_broken_file() -> None:
    broken = {"services": {"kafka": {"image": "apache/kafka", "ports": "9092"}}}
    try:
        jsonschema.validate(broken, compose_schema())
    except jsonschema.ValidationError as error:
        assert error.json_path == "$.services.kafka" and "'ports'" in error.message
    else:
        raise AssertionError("a string for ports must not validate")


def test_compose_refuses_to_start_without_a_storage_password() -> None:
    with pytest.raises(KeyError, match="MINIO_ROOT_PASSWORD"):
        compose({})


def test_every_image_is_pinned_and_kafka_is_the_version_the_tests_run() -> None:
    spec = compose(VARIABLES)
    images = [s["image"] for s in spec["services"].values() if "image" in s]
    assert all(":" in image and not image.endswith(":latest") for image in images), images
    fetched = re.search(r'KAFKA_VERSION="\$\{KAFKA_VERSION:-([^}]+)\}"',
                        (ROOT / "lambdalake/scripts/kafka_fetch.sh").read_text())
    assert fetched is not None
    assert spec["services"]["kafka-1"]["image"] == f"apache/kafka:{fetched.group(1)}"


def test_spark_runs_from_the_image_so_its_version_is_the_drivers() -> None:
    """The Spark master and worker are the lambdalake image's pyspark: no second Spark
    whose version could drift from the one the batch job is written against."""
    spec = compose(VARIABLES)
    for name in ("spark-master", "spark-worker"):
        service = spec["services"][name]
        assert service["build"] == "." and service["entrypoint"][0] == "spark-class"
    assert "spark://spark-master:7077" in spec["services"]["spark-worker"]["entrypoint"]


def test_every_lambdalake_service_command_and_environment_is_one_the_cli_accepts() -> None:
    spec = compose(VARIABLES)
    services = lambdalake_services(spec)
    assert set(services) == {"functions", "speed", "serving", "scheduler"}
    for name, service in services.items():
        options = parse_cli(service["command"])
        assert set(options["role"]) <= set(ROLES), name
        settings = {k: v for k, v in service["environment"].items()
                    if k.startswith("LAMBDALAKE_")}
        unknown = {k for k in settings if k.removeprefix("LAMBDALAKE_").lower()
                   not in Settings.model_fields}
        assert not unknown, f"{name}: not settings: {unknown}"
        keys = {"LAMBDALAKE_API_KEYS_FILE": ""}  # the secret exists only in the container
        with pytest.MonkeyPatch.context() as env:
            for key, value in (settings | keys).items():
                env.setenv(key, str(value))
            env.delenv("LAMBDALAKE_API_KEYS_FILE")
            assert Settings().bus == "kafka"
    assert set().union(*(parse_cli(s["command"])["role"] for s in services.values())) == \
        set(ROLES)


def test_the_image_installs_the_wheel_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM ", dockerfile, re.M)
    assert len(stages) >= 2
    assert "python -m build --wheel" in dockerfile and "pip install -e" not in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert "openjdk-17-jre-headless" in dockerfile and "spark_jars.sh" in dockerfile


# -- every lambdalake service of the compose file, run locally ------------------------------


class Deployment:
    """The compose file's lambdalake services as local processes of the installed wheel."""

    def __init__(self, bin_dir: Path, root: Path, hosts: dict[str, str]):
        self.bin, self.root, self.hosts = bin_dir, root, hosts
        self.ports = {"LAMBDALAKE_GATEWAY_PORT": free_port(), "LAMBDALAKE_API_PORT": free_port(),
                      "LAMBDALAKE_PG_PORT": free_port()}
        self.keys = {scope: uuid.uuid4().hex for scope in ("ingest", "query", "admin")}
        self.secret = root / "api_keys.json"
        self.secret.write_text(json.dumps([{"key": key, "scopes": [scope], "name": scope}
                                           for scope, key in self.keys.items()]))
        self.processes: list[subprocess.Popen] = []

    def environment(self, service: dict[str, Any], home: Path) -> dict[str, str]:
        """The service's compose environment, hostnames and ports mapped to this machine."""
        mapped = {}
        for key, value in service["environment"].items():
            text = str(value)
            for host, local in self.hosts.items():
                text = text.replace(host, local)
            mapped[key] = ",".join(dict.fromkeys(text.split(","))) if "," in text else text
        mapped["LAMBDALAKE_API_KEYS_FILE"] = str(self.secret)  # the mounted secret
        mapped["LAMBDALAKE_SPEED_METRICS_PORT"] = str(free_port())
        base = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDALAKE_")}
        return base | mapped | {k: str(v) for k, v in self.ports.items()} | \
            {"LAMBDALAKE_HOME": str(home)}

    def start(self, name: str, service: dict[str, Any]) -> None:
        home = self.root / name
        home.mkdir()
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (held by the process)
        self.processes.append(subprocess.Popen(
            [self.bin / "lambdalake", *service["command"]], env=self.environment(service, home),
            cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def url(self, port: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[port]}{path}"

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                         for p in sorted(self.root.glob("*.log")))


def wait_ok(url: str, seconds: float, deployment: Deployment) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready\n{deployment.logs()}")


@pytest.mark.kafka
@pytest.mark.spark
@pytest.mark.long  # about 3 minutes: a wheel built and installed, four services, a Spark run
@pytest.mark.skipif(not shutil.which("java"), reason="needs Java 17+")
def test_every_compose_service_runs_from_the_wheel_and_answers_exactly(
    installed_with_spark: Path, kafka_broker, s3_server: str, tmp_path: Path  # noqa: F811
) -> None:
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    variables = VARIABLES | {  # as an operator's .env would set them
        "MINIO_ROOT_USER": "testing", "LAMBDALAKE_TOPIC": f"deploy-{uuid.uuid4().hex[:8]}",
        "LAMBDALAKE_PARTITIONS": "2", "LAMBDALAKE_STORE": f"s3://{bucket}/lake",
        "LAMBDALAKE_REPLICATION_FACTOR": "1", "LAMBDALAKE_MIN_INSYNC_REPLICAS": "1",
        "LAMBDALAKE_BATCH_INTERVAL_SECONDS": "5"}
    hosts = {f"kafka-{n}:9092": kafka_broker.bootstrap for n in (1, 2, 3)} | {
        "http://minio:9000": s3_server, "spark://spark-master:7077": "local[2]"}
    deployment = Deployment(installed_with_spark, tmp_path, hosts)
    try:
        for name, service in lambdalake_services(compose(variables)).items():
            deployment.start(name, service)
        wait_ok(deployment.url("LAMBDALAKE_API_PORT", "/readyz"), 120, deployment)
        wait_ok(deployment.url("LAMBDALAKE_GATEWAY_PORT", "/healthz"), 60, deployment)
        stream = WebAnalyticsStream(seed=41)
        events = [stream.event(now_ms()) for _ in range(1_000)]
        stats = ProduceStats()
        with httpx.Client(timeout=30, headers={KEY_HEADER: deployment.keys["ingest"]}) as client:
            for start in range(0, len(events), 200):
                send_batch(client, deployment.url("LAMBDALAKE_GATEWAY_PORT", "/events"),
                           events[start:start + 200], stats, attempts=60)
        assert stats.accepted == len(events)
        pageviews, _ = recompute(events)
        answer = wait_for_batch(deployment, pageviews, 240)
        assert answer["freshness"]["batch_version"] is not None, deployment.logs()
        assert {r["url"]: r["pageviews"] for r in answer["rows"]} == pageviews
    finally:
        deployment.stop()


def wait_for_batch(deployment: Deployment, expected: dict, seconds: float) -> dict:
    """The pageviews answer once it is exact and served from a batch version (the scheduler's
    Spark run) merged with real time."""
    url = deployment.url("LAMBDALAKE_API_PORT", "/views/pageviews_by_url_hour")
    headers = {KEY_HEADER: deployment.keys["query"]}
    deadline = time.monotonic() + seconds
    answer: dict = {}
    while time.monotonic() < deadline:
        answer = httpx.get(url, params={"bucket": "total"}, headers=headers, timeout=30).json()
        exact = {r["url"]: r["pageviews"] for r in answer["rows"]} == expected
        if exact and answer["freshness"]["batch_version"] is not None:
            return answer
        time.sleep(1)
    return answer


@pytest.mark.parametrize(("args", "said"), [
    (["--role", "serving"], "error: --role: on the embedded bus every role runs in one process"),
    (["--bus", "kafka", "--role", "gateway"], "error: --role 'gateway': use one of functions,"),
])
def test_up_refuses_a_role_it_cannot_run_in_one_line(tmp_path: Path, args: list[str],
                                                     said: str) -> None:
    done = subprocess.run([Path(sys.executable).parent / "lambdalake", "up", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env=os.environ | {"LAMBDALAKE_HOME": str(tmp_path)})
    assert done.returncode == 1 and done.stderr.startswith(said), done.stderr
    assert done.stderr.count("\n") == 1


def test_more_in_sync_replicas_than_replicas_is_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"min_insync_replicas \(3\) must not exceed "
                                         r"replication_factor \(2\)"):
        Settings(replication_factor=2, min_insync_replicas=3)


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


def test_the_template_holds_the_alarms_lambdalake_functions_alarms_writes() -> None:
    text = TEMPLATE.read_text()
    assert with_alarms(text) == text


def test_lambdalake_functions_alarms_writes_a_missing_pair_and_refuses_a_template_without_markers(
        tmp_path: Path) -> None:
    stale = tmp_path / "template.yaml"
    without = re.sub(r"(?ms)^  CdcThrottlesAlarm:\n.*?(?=^  \S)", "", TEMPLATE.read_text())
    stale.write_text(without)
    lambdalake = str(Path(sys.executable).parent / "lambdalake")
    done = subprocess.run([lambdalake, "functions", "alarms", "--template", str(stale)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "  CdcThrottlesAlarm:\n" not in without and stale.read_text() == TEMPLATE.read_text()
    stale.write_text(without.replace(BEGIN, ""))
    done = subprocess.run([lambdalake, "functions", "alarms", "--template", str(stale)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "no place for its alarms" in done.stderr


def test_http_ingestion_is_behind_the_api_key_authorizer_and_the_bus_is_a_choice() -> None:
    document = sam_document()
    api = document["Resources"]["IngestApi"]["Properties"]["Auth"]
    authorizer = api["Authorizers"][api["DefaultAuthorizer"]]
    assert authorizer["FunctionArn"] == {"Fn::GetAtt": "Authorizer.Arn"}
    assert document["Parameters"]["Bus"]["AllowedValues"] == ["kafka", "kinesis"]
    assert {"UseKafka", "UseKinesis", "InVpc"} <= document["Conditions"].keys()
    assert {"SubnetIds", "SecurityGroupIds", "KafkaSecretArn"} <= document["Parameters"].keys()


def resolved(value: Any, parameters: dict[str, str], conditions: dict[str, bool]) -> Any:
    """A template value with its `Ref`s to parameters and its `Fn::If`s resolved."""
    if isinstance(value, list):
        return [resolved(item, parameters, conditions) for item in value]
    if not isinstance(value, dict):
        return value
    if value.keys() == {"Ref"} and value["Ref"] in parameters:
        return parameters[value["Ref"]]
    if value.keys() == {"Fn::If"}:
        condition, then, otherwise = value["Fn::If"]
        return resolved(then if conditions[condition] else otherwise, parameters, conditions)
    return {key: resolved(item, parameters, conditions) for key, item in value.items()}


@pytest.mark.parametrize("runs_on", ["duckdb", "emr-serverless"])
def test_the_nightly_batch_runs_in_the_function_or_on_emr_serverless_as_a_parameter_says(
    runs_on: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lambdalake.functions.emr import EMR_SERVERLESS, job_request

    document = sam_document()
    parameters = {name: str(spec.get("Default", "")) for name, spec in
                  document["Parameters"].items()}
    parameters |= {"BatchRunsOn": runs_on, "EmrApplicationId": "00f1abc",
                   "EmrExecutionRoleArn": "arn:aws:iam::123456789012:role/lake-batch"}
    on_emr = runs_on == EMR_SERVERLESS
    nightly = resolved(document["Resources"]["NightlyBatch"]["Properties"], parameters,
                       {"BatchOnEmr": on_emr})
    for name, value in nightly["Environment"]["Variables"].items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    if on_emr:
        assert (settings.batch_engine, settings.spark_master) == ("spark", EMR_SERVERLESS)
        request = job_request(settings, "token")
        assert request["applicationId"] == "00f1abc"
        assert request["executionRoleArn"].endswith("role/lake-batch")
    else:
        assert (settings.batch_engine, settings.spark_master) == ("duckdb", "local[*]")
    statements = [statement for policy in nightly["Policies"] if isinstance(policy, dict)
                  for statement in policy.get("Statement", [])]
    granted: set[str] = set()
    for statement in statements:
        action = statement["Action"]
        granted |= {action} if isinstance(action, str) else set(action)
    emr_actions = {"emr-serverless:StartJobRun", "emr-serverless:GetJobRun", "iam:PassRole"}
    assert (emr_actions <= granted) == on_emr
