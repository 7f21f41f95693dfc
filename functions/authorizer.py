"""The HTTP API's Lambda authorizer (payload format 2.0, simple responses): API keys with
the `ingest` scope, the keys the serving layer shares (`LAMBDALAKE_API_KEYS`).

API Gateway calls it before `ingest`, with the request's headers; it answers
`{"isAuthorized": ...}` and, when authorized, the key's name in `context` (as
`$context.authorizer.lambda.key` to the integration and the access log). A request without a
key never reaches it: the identity sources are required, so API Gateway answers 401 itself.
`ingest` checks the key again, so the local gateway, which runs no authorizer, refuses the same.
"""

from __future__ import annotations

from typing import Any

from lambdalake.auth import AuthError
from lambdalake.functions.environment import PerColdStart

keyring = PerColdStart(lambda settings: settings.keyring)


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    try:
        key = keyring().authorize(event.get("headers") or {}, "ingest")
    except AuthError as refused:
        return {"isAuthorized": False, "context": {"reason": refused.rule}}
    return {"isAuthorized": True, "context": {"key": key.label if key else "open"}}
