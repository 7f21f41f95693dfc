"""API keys with scopes, shared by ingestion (the gateway's functions) and the serving API.

A key holds one or more scopes: `ingest` (POST /events), `query` (the views, /sql and the
serving metrics), `admin` (operations that change state). Scopes are not hierarchical: a key
holds exactly the scopes it lists. A plain string in the settings is a key with every scope.

Pure: the settings read the keys (environment, `lambdalake.toml` or a secrets file); this
module checks them. A key is never logged nor echoed in an error: only its name, which
defaults to a short fingerprint (`key-` and 8 hex digits of its SHA-256).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

Scope = Literal["ingest", "query", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
KEY_HEADER = "X-API-Key"
BEARER_HEADER = "Authorization"
_HOW = f"send {KEY_HEADER}: <key> or {BEARER_HEADER}: Bearer <key>"


def fingerprint(key: str) -> str:
    """A short name of a key safe to log: it does not reveal the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class ApiKey(BaseModel):
    """One key: `{"key": "...", "scopes": ["query"], "name": "grafana"}`, or a plain string."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    key: SecretStr = Field(description="Visible ASCII characters, no spaces.")
    scopes: frozenset[Scope] = Field(frozenset(SCOPES), min_length=1)
    name: str | None = Field(None, min_length=1, max_length=64,
                             description="Shown in logs and errors; default a fingerprint.")

    @model_validator(mode="before")
    @classmethod
    def _plain_string_has_every_scope(cls, value: Any) -> Any:
        return {"key": value} if isinstance(value, str) else value

    @field_validator("key")
    @classmethod
    def _sendable_in_a_header(cls, key: SecretStr) -> SecretStr:
        text = key.get_secret_value()
        if not text.strip():
            raise ValueError("must not be empty or whitespace")
        if not all("!" <= char <= "~" for char in text):
            raise ValueError("must be visible ASCII characters only: no spaces, no control "
                             "or non-ASCII characters (HTTP headers could not carry it)")
        return key

    @property
    def label(self) -> str:
        return self.name or fingerprint(self.key.get_secret_value())

    @cached_property
    def digest(self) -> bytes:
        return hashlib.sha256(self.key.get_secret_value().encode()).digest()


API_KEYS = TypeAdapter(list[ApiKey])


def parse_key_file(text: str, suffix: str) -> list[ApiKey]:
    """The keys of a secrets file: a JSON list like LAMBDALAKE_API_KEYS (`.json`), or TOML
    tables `[[keys]]` with `key`, `scopes` and `name` (`.toml`). Errors never quote a key."""
    try:
        data = tomllib.loads(text).get("keys", []) if suffix == ".toml" else json.loads(text)
    except ValueError as exc:  # their messages give a position, never the text
        raise ValueError(f"not valid {'TOML' if suffix == '.toml' else 'JSON'}: {exc}") from None
    try:
        return API_KEYS.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "$"
        raise ValueError(f"entry {where}: {first['msg'].removeprefix('Value error, ')}") from None


def unique_keys(keys: list[ApiKey]) -> list[ApiKey]:
    """`keys`, refused if one key is given twice (its scopes would be ambiguous)."""
    seen: dict[bytes, str] = {}
    for key in keys:
        if key.digest in seen:
            raise ValueError(f"one key is given twice ({seen[key.digest]!r}, {key.label!r})")
        seen[key.digest] = key.label
    return keys


class AuthError(Exception):
    """A request refused: 401 (no valid key) or 403 (a valid key without the scope)."""

    def __init__(self, status: int, header: str, rule: str):
        super().__init__(f"{header}: {rule}")
        self.status, self.header, self.rule = status, header, rule

    @property
    def headers(self) -> dict[str, str]:
        return {"www-authenticate": "Bearer"} if self.status == 401 else {}


@dataclass(frozen=True)
class Credentials:
    header: str  # the header the key came in, or would have
    key: str | None


def credentials(headers: Mapping[str, str]) -> Credentials:
    """The key a request offers: `X-API-Key`, else `Authorization: Bearer`; header names
    in any case (API Gateway lower-cases them, HTTP clients need not)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    if key := lowered.get(KEY_HEADER.lower(), "").strip():
        return Credentials(KEY_HEADER, key)
    authorization = lowered.get(BEARER_HEADER.lower(), "").strip()
    if not authorization:
        return Credentials(KEY_HEADER, None)
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return Credentials(BEARER_HEADER, token if scheme.lower() == "bearer" and token else None)


class Keyring:
    """The configured keys; no keys at all means the API is open (nothing is checked)."""

    def __init__(self, keys: list[ApiKey]):
        self.keys = tuple(unique_keys(keys))

    @property
    def open(self) -> bool:
        return not self.keys

    def authorize(self, headers: Mapping[str, str], scope: Scope) -> ApiKey | None:
        """The key the request offers, if it holds `scope` (None when the keyring is open);
        else AuthError. Every configured key is compared, in constant time each."""
        if self.open:
            return None
        offered = credentials(headers)
        if offered.key is None:
            raise AuthError(401, offered.header, f"missing API key; {_HOW}")
        digest = hashlib.sha256(offered.key.encode()).digest()
        matches = [key for key in self.keys if hmac.compare_digest(digest, key.digest)]
        if not matches:
            raise AuthError(401, offered.header, f"unknown API key; {_HOW}")
        if scope not in matches[0].scopes:
            raise AuthError(403, offered.header,
                            f"API key {matches[0].label!r} lacks the {scope!r} scope")
        return matches[0]

    def key_for(self, scope: Scope) -> str | None:
        """A configured key holding `scope`, for this installation's own clients (the CLI)."""
        for key in self.keys:
            if scope in key.scopes:
                return key.key.get_secret_value()
        return None

    def described(self) -> list[dict[str, Any]]:
        """Each key's name and scopes, what may be logged of them."""
        return [{"name": key.label, "scopes": sorted(key.scopes)} for key in self.keys]
