"""The `context` object a handler gets, as AWS Lambda's Python runtime gives it."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

REGION = "us-east-1"
ACCOUNT = "123456789012"


@dataclass(frozen=True, slots=True)
class LambdaContext:
    function_name: str
    memory_limit_in_mb: int
    invoked_function_arn: str
    aws_request_id: str
    deadline: float  # time.monotonic() at which the invocation times out
    function_version: str = "$LATEST"

    @classmethod
    def start(cls, function_name: str, memory_mb: int, timeout_seconds: float,
              version: str = "$LATEST", alias: str | None = None) -> LambdaContext:
        """The context of an invocation starting now (through `alias`, running `version`)."""
        arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{function_name}"
        return cls(
            function_name=function_name,
            memory_limit_in_mb=memory_mb,
            invoked_function_arn=f"{arn}:{alias}" if alias else arn,
            aws_request_id=str(uuid.uuid4()),
            deadline=time.monotonic() + timeout_seconds,
            function_version=version,
        )

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))
