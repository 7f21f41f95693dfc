"""The package's layout rules that the import contracts rely on."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

from lambdalake.functions.runtime.template import load_template

REPO = Path(__file__).resolve().parents[1]
PARTS = ("batch", "speed", "serving", "functions")


def contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"]


def test_the_kernel_contract_lists_every_kernel_module() -> None:
    """A kernel module missing from the contract would be free to import the parts."""
    kernel = {f"lambdalake.{p.stem}" for p in (REPO / "lambdalake").glob("*.py")
              if p.stem != "__init__"}
    kernel |= {f"lambdalake.{p.parent.name}" for p in (REPO / "lambdalake").glob("*/__init__.py")
               if p.parent.name != "stack"}
    [contract] = [c for c in contracts() if c["name"].startswith("The kernel imports no part")]
    assert set(contract["source_modules"]) == kernel


def test_nothing_imports_the_parts_by_their_bare_names() -> None:
    """`import batch` would find a user's own batch.py, or load a module twice under two
    names (its Prometheus collectors would clash)."""
    found = []
    for path in REPO.rglob("*.py"):
        parts = path.relative_to(REPO).parts
        if "build" in parts or any(part.startswith(".") for part in parts):  # venvs, caches
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module
                and not node.level else [])
            found += [f"{path.relative_to(REPO)}: {n}" for n in names
                      if n.split(".")[0] in PARTS]
    assert found == []


def test_the_ingest_handler_loads_no_engine() -> None:
    """What the import contract states, at run time: loading the ingest handler, and the
    project it validates against, loads no pyarrow, DuckDB or Spark (the metric kinds'
    `datasketches` brings numpy)."""
    probe = ("import sys, lambdalake.functions.ingest as ingest; ingest.validator(); "
             "print(sorted(m for m in ('pyarrow', 'duckdb', 'pyspark') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=REPO / "tests", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_handler_of_the_shipped_template_imports() -> None:
    """`template.yaml` at the repository's root is the package's own (a link), and each of
    its handlers is a callable under lambdalake.functions."""
    assert (REPO / "template.yaml").resolve() == REPO / "functions" / "template.yaml"
    for spec in load_template().functions.values():
        module, _, attribute = spec.handler.rpartition(".")
        assert module.startswith("lambdalake.functions."), spec.handler
        assert callable(getattr(importlib.import_module(module), attribute))
