"""Files shipped inside the package (the fetch scripts), read through `importlib.resources`,
so an installed wheel runs anywhere: no path is relative to a source checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from importlib.resources import as_file, files


class ScriptFailed(RuntimeError):
    """A bundled script exited non-zero; the message ends with its stderr."""


def run_script(name: str, env: Mapping[str, str] | None = None) -> str:
    """Run the bundled `scripts/<name>` with bash; return the last line it printed."""
    with as_file(files("lambdalake") / "scripts" / name) as script:
        done = subprocess.run(
            ["bash", str(script)],
            capture_output=True,
            text=True,
            env=os.environ | {"PYTHON": sys.executable} | dict(env or {}),
        )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise ScriptFailed(f"{name} failed: {done.stderr.strip()[-500:]}")
    return lines[-1]
