"""The package's layout rules that the import contracts rely on."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

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
        if {".venv", "build"} & set(path.relative_to(REPO).parts):
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


def test_the_shipped_template_is_the_repository_template_and_its_handlers_import() -> None:
    """The local runtime reads the template shipped in the package; SAM reads the one at the
    top. A stale copy named handlers that no longer import, and every ingest answered 500."""
    import importlib

    from lambdalake.functions.runtime.template import load_template

    shipped = (REPO / "functions" / "template.yaml").read_text()
    assert shipped == (REPO / "template.yaml").read_text()
    for spec in load_template().functions.values():
        module, _, attribute = spec.handler.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attribute)), spec.handler
