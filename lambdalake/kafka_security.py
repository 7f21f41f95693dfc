"""How every Kafka client connects: one description, in each client library's dialect.

The security protocol, SASL mechanism and CA file come from settings
(`LAMBDALAKE_KAFKA_SECURITY_PROTOCOL`, `_SASL_MECHANISM`, `_CA_FILE`); the credentials from
`kafka_username` / `kafka_password`, or from the Secrets Manager secret `kafka_secret_arn`
names (the SASL/SCRAM secret format of MSK and of Lambda's Kafka event-source mappings:
`{"username": ..., "password": ...}`), read once per process. This covers Amazon MSK, Confluent
Cloud (SASL_SSL, PLAIN) and self-managed clusters.

Dialects: `kafka_python()` (the bus's producer, admin, the local mapping's consumers) and
`librdkafka()` (confluent-kafka and Quix Streams: the speed layer, the serving feed); the
Faust driver builds its `broker_credentials` from the same fields. No client library is
imported here: ingestion's package holds only the one it uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from lambdalake.settings import Settings


@dataclass(frozen=True)
class KafkaSecurity:
    protocol: str = "PLAINTEXT"
    mechanism: str = "SCRAM-SHA-512"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL")

    @property
    def tls(self) -> bool:
        return self.protocol.endswith("SSL")

    def kafka_python(self) -> dict[str, Any]:
        return self._options(_KAFKA_PYTHON, self.protocol)

    def librdkafka(self) -> dict[str, Any]:
        return self._options(_LIBRDKAFKA, self.protocol.lower())

    def _options(self, names: dict[str, str], protocol: str) -> dict[str, Any]:
        options: dict[str, Any] = {names["protocol"]: protocol}
        if self.sasl:
            options |= {names[part]: getattr(self, part)
                        for part in ("mechanism", "username", "password")}
        if self.tls and self.ca_file:
            options[names["ca_file"]] = self.ca_file
        return options


PLAINTEXT = KafkaSecurity()
# each client library's names for the parts of a KafkaSecurity
_KAFKA_PYTHON = {"protocol": "security_protocol", "mechanism": "sasl_mechanism",
                 "username": "sasl_plain_username", "password": "sasl_plain_password",
                 "ca_file": "ssl_cafile"}
_LIBRDKAFKA = {"protocol": "security.protocol", "mechanism": "sasl.mechanism",
               "username": "sasl.username", "password": "sasl.password",
               "ca_file": "ssl.ca.location"}


def kafka_security(settings: Settings) -> KafkaSecurity:
    """The settings' Kafka security, its credentials from the secret when one is named."""
    username = settings.kafka_username
    password = settings.kafka_password.get_secret_value() if settings.kafka_password else None
    if settings.kafka_secret_arn:
        username, password = secret_credentials(settings.kafka_secret_arn)
    security = KafkaSecurity(settings.kafka_security_protocol, settings.kafka_sasl_mechanism,
                             username, password,
                             str(settings.kafka_ca_file) if settings.kafka_ca_file else None)
    if security.sasl and not (username and password):
        raise ValueError(f"kafka_security_protocol {security.protocol} needs a username and "
                         "password: kafka_username and kafka_password, or kafka_secret_arn")
    return security


@lru_cache(maxsize=4)
def secret_credentials(arn: str) -> tuple[str, str]:
    """(username, password) from a Secrets Manager secret (its endpoint as boto3 finds it:
    `AWS_ENDPOINT_URL_SECRETS_MANAGER` reaches a local one)."""
    import boto3

    text = boto3.client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"]
    try:
        secret = json.loads(text)
        return str(secret["username"]), str(secret["password"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"kafka_secret_arn {arn}: the secret must be JSON with a username "
                         "and a password") from None
