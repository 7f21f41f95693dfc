"""Kafka with SASL/SCRAM, as on MSK, Confluent Cloud and a secured self-managed cluster.

A real KRaft broker with a SASL_PLAINTEXT SCRAM-SHA-512 listener; the credentials come from
a Secrets Manager secret on the moto server, named by settings as the template names it.
Every kind of client the project builds (kafka-python producer, admin and consumers,
librdkafka consumers) connects through `lambdalake.kafka_security`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import boto3
import certifi
import pytest

from lambdalake.bus import open_bus
from lambdalake.eventlog import now_ms
from lambdalake.events import Event
from lambdalake.functions.runtime.kafka_source import KafkaTopic
from lambdalake.kafka_security import KafkaSecurity, kafka_security, secret_credentials
from lambdalake.settings import Settings
from lambdalake.speed.faust_app import broker_credentials
from lambdalake.speed.kafka_common import read_partition
from lambdalake.testing.kafka import KafkaBroker, read_topic

pytestmark = pytest.mark.kafka
USER, PASSWORD = "lake", "s3cret-Pa55"


@pytest.fixture(scope="module")
def scram_broker() -> Iterator[KafkaBroker]:
    with KafkaBroker(scram_users={USER: PASSWORD}, partitions=2) as broker:
        yield broker


@pytest.fixture
def secrets(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", s3_server)
    secret_credentials.cache_clear()
    yield boto3.client("secretsmanager", endpoint_url=s3_server)
    secret_credentials.cache_clear()


def secret(client: object, name: str, value: str) -> str:
    return client.create_secret(Name=name, SecretString=value)["ARN"]  # type: ignore[attr-defined]


def event(event_id: str) -> Event:
    return Event(event_id, "purchase", now_ms(), {"user_id": "u", "sku": "s", "amount": 1.5})


def test_each_client_dialect_carries_the_settings():
    ca = certifi.where()
    security = kafka_security(Settings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_username="u", kafka_password="pw-42", kafka_ca_file=ca))
    assert security.kafka_python() == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "u", "sasl_plain_password": "pw-42",
        "ssl_cafile": ca}
    assert security.librdkafka() == {
        "security.protocol": "sasl_ssl", "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "u", "sasl.password": "pw-42", "ssl.ca.location": ca}
    credentials = broker_credentials(security)
    assert (credentials.username, credentials.password) == ("u", "pw-42")
    assert "pw-42" not in repr(security)  # the password never reaches a log line
    assert kafka_security(Settings()).kafka_python() == {"security_protocol": "PLAINTEXT"}
    with pytest.raises(ValueError, match="SASL_SSL needs a username and password"):
        kafka_security(Settings(kafka_security_protocol="SASL_SSL"))


def test_credentials_come_from_the_secret_the_template_names(secrets: object):
    arn = secret(secrets, "kafka-creds", json.dumps({"username": "from-secret",
                                                      "password": "pw"}))
    settings = Settings(kafka_security_protocol="SASL_SSL", kafka_username="ignored",
                        kafka_password="ignored", kafka_secret_arn=arn)
    security = kafka_security(settings)
    assert (security.username, security.password) == ("from-secret", "pw")
    broken = secret(secrets, "broken", "not json")
    with pytest.raises(ValueError, match="the secret must be JSON with a username and a pass"):
        kafka_security(Settings(kafka_security_protocol="SASL_SSL", kafka_secret_arn=broken))


def test_every_client_authenticates_with_scram(scram_broker: KafkaBroker, secrets: object):
    arn = secret(secrets, "msk-creds", json.dumps({"username": USER, "password": PASSWORD}))
    settings = Settings(bus="kafka", kafka_bootstrap=scram_broker.sasl_bootstrap,
                        topic="secured", partitions=2, kafka_security_protocol="SASL_PLAINTEXT",
                        kafka_secret_arn=arn)
    security = kafka_security(settings)
    # admin (the topics) and the idempotent producer, as the ingest handler opens them
    open_bus(settings).publish([event("a"), event("b")], timeout_s=30)

    logged = read_topic(settings.kafka_bootstrap, "secured", security)  # librdkafka
    assert sorted(m.key().decode() for m in logged) == ["a", "b"]
    # the archive source: librdkafka readers, kafka-python for the committed positions
    topic = KafkaTopic(settings.kafka_bootstrap, "secured", security=security)
    try:
        read = [r for p in topic.partitions for r in p.read(0, 10)]
        assert sorted(json.loads(r.value)["event_id"] for r in read) == ["a", "b"]
        topic.commit("archive", {0: 1})
        assert topic.committed("archive")[0] == 1
    finally:
        topic.close()
    partition = logged[0].partition()
    values = list(read_partition(settings.kafka_bootstrap, "secured", partition, 10,
                                 timeout_s=30, security=security))
    assert len(values) == sum(m.partition() == partition for m in logged)


def test_a_wrong_password_is_refused(scram_broker: KafkaBroker):
    """The listener enforces SCRAM: what passes above passed by its credentials."""
    from confluent_kafka import Consumer, KafkaError, KafkaException

    wrong = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-512", USER, "wrong")
    errors: list[KafkaError] = []
    consumer = Consumer({"bootstrap.servers": scram_broker.sasl_bootstrap, "group.id": "x",
                         "error_cb": errors.append, **wrong.librdkafka()})
    try:
        with pytest.raises(KafkaException):
            consumer.list_topics(timeout=3)
    finally:
        consumer.close()
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
