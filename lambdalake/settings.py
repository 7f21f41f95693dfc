"""Settings: `LAMBDALAKE_*` environment variables over `lambdalake.toml` over defaults."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEDUP_MAX_IDS = 5_000_000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LAMBDALAKE_", toml_file="lambdalake.toml", extra="ignore"
    )

    home: Path = Field(Path(".lambdalake"), description="Local state: event log, checkpoints.")
    store: str = Field("", description="Object store URL: file:///path or s3://bucket/prefix.")
    s3_endpoint_url: str | None = None
    project: str = Field("lambdalake.example:project", description="module:attribute")

    bus: Literal["embedded", "kafka"] = "embedded"
    partitions: int = Field(4, ge=1, le=256)
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic: str = "lambdalake.events"
    speed_engine: Literal["quix", "faust"] = Field(
        "quix", description="The speed driver on Kafka (see the README's benchmark)."
    )

    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_keys: list[str] = Field(default_factory=list, description="Empty: no key needed.")

    slice_seconds: int = Field(60, ge=1, description="Width of an arrival slice; cuts align to it.")
    dedup_window_hours: float = Field(24.0, gt=0)
    dedup_max_ids: int = Field(
        DEDUP_MAX_IDS, ge=1_000,
        description="Ids one speed state holds (one per Kafka partition); past it the oldest "
        "are forgotten before the window ends.",
    )
    max_future_seconds: int = Field(300, ge=0, description="How far ahead of now `ts` may be.")
    versions_kept: int = Field(5, ge=1)
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
    spark_master: str = Field("local[*]", description="Spark master URL of the spark engine.")
    flush_interval_ms: int = Field(200, ge=10, description="Speed layer publish cadence.")
    supervised: bool = Field(
        False, description="A worker started by `lambdalake up`: it exits when `up` does."
    )
    speed_metrics_host: str = "127.0.0.1"
    speed_metrics_port: int = Field(
        0, ge=0, description="A Kafka speed worker's /metrics and /healthz; 0: none."
    )
    archive_batch_size: int = Field(10_000, ge=1)
    archive_window_ms: int = Field(1_000, ge=0)

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

    @property
    def store_url(self) -> str:
        return self.store or (self.home.resolve() / "lake").as_uri()

    @property
    def slice_ms(self) -> int:
        return self.slice_seconds * 1000

    @property
    def dedup_window_ms(self) -> int:
        return int(self.dedup_window_hours * 3_600_000)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
