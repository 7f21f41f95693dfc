"""Settings: `LAMBDALAKE_*` environment variables over `lambdalake.toml` over defaults."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, TypedDict

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from lambdalake.auth import ApiKey, Keyring, parse_key_file, unique_keys

DEDUP_MAX_IDS = 5_000_000


class UvicornTls(TypedDict, total=False):
    """uvicorn.Config's TLS arguments: both, or neither."""

    ssl_certfile: str
    ssl_keyfile: str


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LAMBDALAKE_", toml_file="lambdalake.toml", extra="ignore",
        hide_input_in_errors=True,  # a refused API key is never echoed
    )

    home: Path = Field(Path(".lambdalake"), description="Local state: event log, checkpoints.")
    store: str = Field("", description="Object store URL: file:///path or s3://bucket/prefix.")
    s3_endpoint_url: str | None = None
    project: str = Field("lambdalake.example:project", description="module:attribute")

    bus: Literal["embedded", "kafka", "kinesis"] = "embedded"
    partitions: int = Field(4, ge=1, le=256)
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic: str = "lambdalake.events"
    kinesis_stream: str = Field(
        "lambdalake-events", description="The Kinesis data stream of the kinesis bus (created "
        "by `lambdalake up` with `partitions` shards when missing).",
    )
    kinesis_endpoint_url: str | None = Field(
        None, description="The Kinesis endpoint (e.g. a moto server); None: AWS's."
    )
    speed_engine: Literal["quix", "faust"] = Field(
        "quix", description="The speed driver on Kafka (see the README's benchmark)."
    )

    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description='JSON list: "key" (every scope) or {"key", "scopes", "name"}; scopes '
        "ingest, query, admin. No keys at all (here or in api_keys_file): no key needed.",
    )
    api_keys_file: Path | None = Field(
        None, description="A secrets file of more keys: .json (a list like api_keys) or "
        ".toml ([[keys]] tables), as compose or Kubernetes secrets are mounted.",
    )
    http_max_connections: int = Field(
        1000, ge=1, description="Open connections each HTTP server (gateway, API) holds; past "
        "it a new one gets 503. Never more than a quarter of the process's file limit.",
    )
    http_read_timeout_seconds: float = Field(
        10.0, gt=0, description="A request's headers and body must arrive within this; "
        "else 408 and the connection is closed.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description='Browser origins allowed to call the API (CORS), '
        'JSON list, e.g. ["https://grafana.example"]; "*" any. Empty: no CORS headers.',
    )
    api_rate_per_key: float = Field(
        1000.0, ge=0, description="Requests a second each API key (or, with no keys, each "
        "client address) may make to the API; past it 429 with Retry-After. 0: no limit.",
    )
    api_burst_per_key: int = Field(2000, ge=1, description="Requests in a burst past the rate.")
    sql_concurrency_per_key: int = Field(
        2, ge=1, le=32, description="POST /sql statements one key may run at once; past it "
        "429 with Retry-After (sql_concurrency bounds them all).",
    )
    tls_certfile: Path | None = Field(
        None, description="A PEM certificate (chain): the gateway and the API serve HTTPS."
    )
    tls_keyfile: Path | None = Field(None, description="The PEM private key of tls_certfile.")
    realtime_stale_ms: int = Field(
        10_000, ge=1, description="Past this real-time lag, answers say `freshness.stale`.",
    )

    slice_seconds: int = Field(60, ge=1, description="Width of an arrival slice; cuts align to it.")
    dedup_window_hours: float = Field(24.0, gt=0)
    dedup_max_ids: int = Field(
        DEDUP_MAX_IDS, ge=1_000,
        description="Ids one speed state holds (one per Kafka partition); past it the oldest "
        "are forgotten before the window ends.",
    )
    max_future_seconds: int = Field(300, ge=0, description="How far ahead of now `ts` may be.")
    versions_kept: int = Field(
        5, ge=1,
        description="Batch versions kept for rollback; the real-time layers keep their slices "
        "down to the oldest one's cut, so a rollback is exact at once.",
    )
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail", description="A corrupt master object: fail the batch run, or skip it."
    )
    batch_interval_seconds: int = Field(60, ge=1)
    batch_lease_seconds: float = Field(
        60.0, ge=1,
        description="One batch run at a time per store: its lease in the store expires this "
        "long after its last renewal (every third of it), so a killed run blocks the next "
        "for at most this long.",
    )
    batch_engine: Literal["duckdb", "spark"] = Field(
        "duckdb", description="Engine of the scheduled batch run (the nightly function)."
    )
    spark_master: str = Field(
        "local[*]", description="Where the spark engine runs: local[N], a cluster master "
        "(spark://host:7077), a Spark Connect server (sc://host:15002), or emr-serverless "
        "(the nightly function submits the job to the EMR Serverless application).",
    )
    emr_application_id: str = Field("", description="EMR Serverless application of the job.")
    emr_execution_role_arn: str = Field(
        "", description="IAM role the EMR Serverless job runs as (reads and writes the store)."
    )
    emr_spark_parameters: str = Field(
        "--conf spark.executor.cores=4 --conf spark.executor.memory=16g "
        "--conf spark.dynamicAllocation.maxExecutors=20",
        description="sparkSubmitParameters of the EMR Serverless job: executor sizing, and "
        "the packed virtualenv holding lambdalake (spark.archives, PYSPARK_PYTHON).",
    )
    emr_endpoint_url: str | None = Field(
        None, description="The EMR Serverless API's endpoint; none: AWS's for the region."
    )
    emr_poll_seconds: float = Field(
        15.0, gt=0, description="How often the nightly function asks for the job run's state."
    )
    flush_interval_ms: int = Field(200, ge=10, description="Speed layer publish cadence.")
    supervised: bool = Field(
        False, description="A worker started by `lambdalake up`: it exits when `up` does."
    )
    speed_metrics_host: str = "127.0.0.1"
    speed_metrics_port: int = Field(
        0, ge=0, description="A Kafka speed worker's /metrics and /healthz; 0: none."
    )
    kinesis_lease_table: str = Field(
        "", description="The DynamoDB table of the Kinesis speed workers' shard leases "
        "(created when missing); empty: `<kinesis_stream>-speed-leases`.",
    )
    kinesis_lease_seconds: float = Field(
        10.0, ge=1, description="A Kinesis speed worker that has not renewed a shard lease "
        "for this long loses it to another worker (renewed every third of it).",
    )
    pg_host: str = Field("127.0.0.1", description="Host of the PostgreSQL wire endpoint.")
    pg_port: int = Field(
        5433, ge=0, le=65_535, description="Port of the PostgreSQL wire endpoint that `up` "
        "and `serve` start beside the API (user: any; password: an API key with the query "
        "scope); 0: none.",
    )
    pg_max_connections: int = Field(
        100, ge=1, description="Open PostgreSQL wire connections; past it a new one is "
        "refused (53300 too_many_connections).",
    )
    sql_concurrency: int = Field(
        2, ge=1, le=32, description="POST /sql statements run at once, each in a sandbox "
        "worker process of its own; past it the API answers 429 with Retry-After.",
    )
    sql_memory_mb: int = Field(
        256, ge=64, le=65_536, description="Memory of one SQL sandbox worker; a statement "
        "past it is stopped (400). DuckDB in the worker gets half of it.",
    )
    sql_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="Wall-clock time of one SQL statement, running it "
        "and encoding its answer; past it the worker is killed (400).",
    )
    sql_max_bytes: int = Field(
        16 * 2**20, ge=1024, le=2**30, description="Bytes of a POST /sql answer; past them "
        "the answer is cut at a row boundary (truncated: true).",
    )
    compact_target_rows: int = Field(
        1_000_000, ge=2, description="Compaction rewrites master objects of closed arrival "
        "ranges (below the serving cut) holding fewer than half this many rows into objects "
        "of up to this many.",
    )
    compact_interval_seconds: int = Field(
        600, ge=1, description="`lambdalake up` compacts the master dataset and applies the "
        "retention below this often.",
    )
    runs_kept: int = Field(1_000, ge=1, description="Batch run records kept in views/_runs/.")
    dead_letter_retention_days: float = Field(
        30.0, gt=0, description="Dead letters whose newest record arrived longer ago than "
        "this are deleted by the scheduled retention and `lambdalake compact`.",
    )
    log_segment_seconds: int = Field(
        3_600, ge=1, description="The embedded log starts a new segment once its open one's "
        "first record is this old, so retention can delete it; a segment is deleted once "
        "archived, folded by the speed layer, and below the cut of the oldest kept version.",
    )
    erase_wait_seconds: float = Field(
        300.0, gt=0, description="How long `lambdalake erase` waits for the archive to pass "
        "the request (every record that arrived before it in the master dataset).",
    )
    archive_batch_size: int = Field(10_000, ge=1)
    archive_window_ms: int = Field(1_000, ge=0)
    landing_url: str = Field(
        "", description="Where partners drop files of events for bulk import: s3://bucket or "
        "file:///folder (watched by `lambdalake up`); empty: <home>/landing.",
    )
    landing_prefix: str = Field(
        "landing/", description="Keys under which landed files are imported; others are "
        "rejected.",
    )
    aws_endpoint_url: str | None = Field(
        None, description="An AWS-compatible endpoint (moto, LocalStack) serving S3, SQS and "
        "DynamoDB Streams: the local runtime runs the template's queue, stream and bucket "
        "notification triggers on it. None: they do not run locally.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How every Kafka client connects (MSK and Confluent Cloud: "
        "SASL_SSL).",
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_username: str | None = None
    kafka_password: SecretStr | None = None
    kafka_secret_arn: str | None = Field(
        None, description="A Secrets Manager secret {\"username\", \"password\"} (MSK's "
        "SASL/SCRAM format) the Kafka credentials are read from, over kafka_username/password.",
    )
    kafka_ca_file: Path | None = Field(
        None, description="PEM CA bundle verifying the brokers' TLS certificates (default: the "
        "system's).",
    )
    function_price_per_gb_second: float = Field(
        0.0000166667, ge=0, description="`lambdalake functions stats`: USD per GB-second.",
    )
    function_price_per_million_requests: float = Field(
        0.20, ge=0, description="`lambdalake functions stats`: USD per million requests.",
    )
    replication_factor: int = Field(
        1, ge=1, le=32, description="Copies of every bus topic's partitions (Kafka); 3 on a "
        "production cluster.",
    )
    min_insync_replicas: int = Field(
        1, ge=1, le=32, description="Copies that must hold a record before it is acknowledged "
        "(acks=all); 2 with replication_factor 3: one broker may be down, nothing is lost.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @model_validator(mode="after")
    def _every_key_once(self) -> Settings:
        if self.api_keys_file is not None:
            self.api_keys = [*self.api_keys, *read_key_file(self.api_keys_file)]
        try:
            unique_keys(self.api_keys)
        except ValueError as exc:
            raise ValueError(f"api_keys: {exc}") from None
        return self

    functions: list[str] = Field(
        default_factory=list, description="The functions of template.yaml this process's "
        "functions runtime runs (e.g. [\"Ingest\"]: the gateway alone); empty: every one.",
    )

    @model_validator(mode="after")
    def _insync_within_replicas(self) -> Settings:
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(f"min_insync_replicas ({self.min_insync_replicas}) must not exceed "
                             f"replication_factor ({self.replication_factor})")
        return self

    @model_validator(mode="after")
    def _certificate_with_its_key(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile: give both, or neither")
        return self

    @property
    def tls(self) -> UvicornTls:
        """uvicorn's TLS options: empty without a certificate."""
        if self.tls_certfile is None or self.tls_keyfile is None:
            return {}
        return {"ssl_certfile": str(self.tls_certfile), "ssl_keyfile": str(self.tls_keyfile)}

    @property
    def keyring(self) -> Keyring:
        return Keyring(self.api_keys)

    @property
    def store_url(self) -> str:
        return self.store or (self.home.resolve() / "lake").as_uri()

    @property
    def landing_store_url(self) -> str:
        return self.landing_url or (self.home.resolve() / "landing").as_uri()

    @property
    def slice_ms(self) -> int:
        return self.slice_seconds * 1000

    @property
    def dedup_window_ms(self) -> int:
        return int(self.dedup_window_hours * 3_600_000)


def read_key_file(path: Path) -> list[ApiKey]:
    try:
        return parse_key_file(path.read_text(), path.suffix.lower())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ValueError(f"api_keys_file {path}: {reason}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
