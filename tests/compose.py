"""docker-compose.yml read as Compose reads it: `${VAR:-default}` interpolation, YAML merge
keys; and each lambdalake service as a local process (no Docker engine here)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
import yaml

from lambdalake.stack.cli import app

ROOT = Path(__file__).resolve().parents[1]
VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation: `${X}`, `${X:-default}`, `${X:?error}`, `$$` for `$`."""
    def value(match: re.Match[str]) -> str:
        name, kind, default = match.groups()
        if variables.get(name):
            return variables[name]
        if kind == "?":
            raise KeyError(f"{name}: {default}")
        return default or ""

    return VARIABLE.sub(value, text).replace("$$", "$")


def compose(variables: Mapping[str, str]) -> dict[str, Any]:
    return yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), variables))


def lambdalake_services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the `lambdalake` command (the image's entrypoint)."""
    return {name: service for name, service in spec["services"].items()
            if service.get("build") and "entrypoint" not in service}


def parse_cli(argv: list[str]) -> dict[str, Any]:
    """The options the CLI parses from `argv`, down to its subcommand; click's UsageError if
    it would refuse them. Nothing is run."""
    command: Any = typer.main.get_command(app)  # typer's own (vendored) click
    context = command.make_context("lambdalake", list(argv))
    while hasattr(command, "resolve_command"):  # a group: on to its subcommand
        name, sub, rest = command.resolve_command(context, [*context._protected_args,
                                                            *context.args])
        command, context = sub, sub.make_context(name, rest, parent=context)
    return dict(context.params)
