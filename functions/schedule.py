"""What every scheduled function takes: an EventBridge Scheduled Event."""

from __future__ import annotations

from typing import Any

SCHEDULED = ("aws.events", "Scheduled Event")


def require_scheduled(event: Any, function: str) -> None:
    """ValueError, naming the shape received, for anything but a Scheduled Event."""
    shape = (event.get("source"), event.get("detail-type")) if isinstance(event, dict) else (
        type(event).__name__,)
    if shape != SCHEDULED:
        raise ValueError(f"{function} takes an EventBridge Scheduled Event, not {shape}")
