"""`lambdalake functions package`: one deployable artifact per function of the template.

Each function gets what its handler imports, and nothing else:
- its import closure, found statically from the handler's module and the project's module
  (`Settings.project`, loaded by name at run time): every first-party module it reaches,
  through imports inside functions too (on AWS the settings pick Kafka or S3, which the
  kernel imports lazily), copied as installed (`functions/ingest.py` is
  `lambdalake/functions/ingest.py`);
- the distributions of the third-party modules it reaches, in the ranges lambdalake declares,
  installed with their dependencies as wheels for the Lambda runtime
  (`pip install --platform manylinux2014_x86_64 --only-binary=:all: --python-version 3.11`).

`PackageType: Zip` functions become `<out>/<Name>.zip` (their template `CodeUri`; the AWS
SDK left to the runtime, which has it), refused
when they reach an engine (pyarrow, DuckDB, Spark) or outgrow Lambda's limits (250 MB
unzipped, 50 MB zipped). `PackageType: Image` functions become a Docker context
`<out>/<Name>/` (their template `Metadata.DockerContext`): a Dockerfile on the AWS Lambda
Python base image, its `requirements.txt` and the first-party code under `app/`.
Installed dependency sets are kept under `<out>/.deps/<hash>` and pip's cache keeps the
wheels, so packaging again is quick. New functions in the template are packaged as they are.
"""

from __future__ import annotations

import ast
import hashlib
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import packages_distributions, requires
from importlib.util import find_spec
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lambdalake.functions.runtime.template import FunctionSpec, Template

FIRST_PARTY = "lambdalake"
ENGINES = ("pyarrow", "duckdb", "pyspark")
# A function never runs Spark (it submits Spark work): the Spark engine's lazy import of
# pyspark is left out of every artifact.
NEVER_PACKAGED = frozenset({"pyspark", "py4j"})
# Lambda's python3.11 runtime has the AWS SDK (1.34 or later); a zip leaves it out (botocore
# alone would double its size). Images keep it, at the version the requirements pick.
RUNTIME_PROVIDED = frozenset({"boto3", "botocore", "s3transfer", "jmespath"})
# Imports (importing module, imported top-level name) a zip leaves out: those the
# import-linter's slim contract ignores (pyproject.toml). A store imports pyarrow only in
# `arrow()`, which readers of Parquet call; a zip function writes to the store (the cdc
# its rejects) and never reads Parquet.
ZIP_IGNORED_IMPORTS = frozenset({("lambdalake.storage", "pyarrow")})
MAX_UNZIPPED_BYTES = 250 * 2**20
MAX_ZIPPED_BYTES = 50 * 2**20
LAMBDA_WHEELS = ("--platform", "manylinux2014_x86_64", "--only-binary=:all:",
                 "--python-version", "3.11", "--implementation", "cp")
BASE_IMAGE = "public.ecr.aws/lambda/python:3.11"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same code always zips to the same bytes


class PackageError(ValueError):
    """A function cannot be packaged as its template declares it."""


@dataclass(frozen=True)
class Closure:
    modules: frozenset[str]  # first-party modules
    requirements: tuple[str, ...]  # distributions, with the ranges lambdalake declares


@dataclass(frozen=True)
class Artifact:
    function: str
    package_type: str
    path: Path  # the zip, or the image's Docker context
    unzipped_bytes: int
    zipped_bytes: int | None  # None for an image


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test or ast.Pass())


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif not _type_checking(node):
            yield from _imports(node)


def _is_module(name: str) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):  # a name inside a module, not a module
        return False


def _imported_names(module: str, is_package: bool, tree: ast.AST) -> Iterator[str]:
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
            continue
        if node.level:  # relative: from the module's package up
            package = module if is_package else module.rpartition(".")[0]
            package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        if base == "__future__":
            continue
        yield base
        yield from (f"{base}.{alias.name}" for alias in node.names)


def import_closure(roots: Iterable[str],
                   ignored: frozenset[tuple[str, str]] = frozenset()) -> Closure:
    """The first-party modules `roots` reach and the distributions of the rest, but for the
    `ignored` imports (importing module, imported top-level name)."""
    first_party = {root.partition(".")[0] for root in roots} | {FIRST_PARTY}
    modules: set[str] = set()
    third_party: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in modules:
            continue
        spec = find_spec(name)
        if spec is None or spec.origin is None:
            raise PackageError(f"module {name} not found")
        modules.add(name)
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
        for imported in _imported_names(name, spec.submodule_search_locations is not None, tree):
            top = imported.partition(".")[0]
            if (name, top) in ignored:
                continue
            if top in first_party:
                if imported not in modules and _is_module(imported):
                    todo.append(imported)
            elif top not in sys.stdlib_module_names:
                third_party.add(top)
    return Closure(frozenset(modules), _requirements(third_party))


def _requirements(top_level: set[str]) -> tuple[str, ...]:
    """The distributions providing `top_level`, each with the range lambdalake declares for
    it (pip picks the newest with a wheel for the platform: numpy past 2.2 has none for
    manylinux2014, the glibc of Lambda's python3.11 runtime)."""
    providers = packages_distributions()
    missing = sorted(top_level - providers.keys())
    if missing:
        raise PackageError(f"no installed distribution provides {', '.join(missing)}")
    declared = {}
    for line in requires(FIRST_PARTY) or []:
        requirement = Requirement(line)
        declared[canonicalize_name(requirement.name)] = f"{requirement.name}{requirement.specifier}"
    names = {canonicalize_name(d) for top in top_level for d in providers[top]} - NEVER_PACKAGED
    return tuple(sorted(declared.get(name, name) for name in names))


def _name(requirement: str) -> str:
    return canonicalize_name(Requirement(requirement).name)


def handler_closure(spec: FunctionSpec, project: str) -> Closure:
    ignored = ZIP_IGNORED_IMPORTS if spec.package_type == "Zip" else frozenset()
    return import_closure([spec.handler.rpartition(".")[0], project.partition(":")[0]], ignored)


def copy_modules(modules: Iterable[str], target: Path) -> None:
    """Each module's source where an installed package keeps it."""
    for name in sorted(modules):
        spec = find_spec(name)
        assert spec is not None and spec.origin is not None
        relative = Path(*name.split("."))
        if spec.submodule_search_locations is not None:
            relative /= "__init__.py"
        else:
            relative = relative.with_suffix(".py")
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.origin, target / relative)


def install_requirements(requirements: Iterable[str], target: Path) -> None:
    """Install distributions (with their dependencies) as Lambda runtime wheels."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-compile", "--target", str(target), *LAMBDA_WHEELS, *requirements]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise PackageError(f"pip could not install the Lambda wheels: {error}")


def dependencies(requirements: tuple[str, ...], deps: Path) -> Path:
    """The installed dependency set of `requirements`, installed once per set under `deps`."""
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:16]
    folder = deps / digest
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        install_requirements(requirements, folder)
        (folder / ".complete").touch()
    return folder


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.name != ".complete":
            yield path


def write_zip(folders: Iterable[Path], target: Path) -> int:
    """Zip the folders' files into one tree, deterministically; the bytes unzipped."""
    unzipped = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for folder in folders:
            for path in _files(folder):
                info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), _ZIP_TIME)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                data = path.read_bytes()
                archive.writestr(info, data)
                unzipped += len(data)
    return unzipped


def package_zip(spec: FunctionSpec, closure: Closure, out: Path, deps: Path) -> Artifact:
    heavy = sorted(name for name in map(_name, closure.requirements) if name in ENGINES)
    if heavy:
        raise PackageError(f"{spec.name}: its handler {spec.handler} imports {', '.join(heavy)}; "
                           "a zip function must not, declare it PackageType: Image")
    code = out / ".code" / spec.name
    shutil.rmtree(code, ignore_errors=True)
    copy_modules(closure.modules, code)
    target = out / f"{spec.name}.zip"
    requirements = tuple(r for r in closure.requirements if _name(r) not in RUNTIME_PROVIDED)
    unzipped = write_zip([dependencies(requirements, deps), code], target)
    artifact = Artifact(spec.name, "Zip", target, unzipped, target.stat().st_size)
    if unzipped > MAX_UNZIPPED_BYTES or target.stat().st_size > MAX_ZIPPED_BYTES:
        raise PackageError(f"{spec.name}: {unzipped / 2**20:.0f} MB unzipped, "
                           f"{target.stat().st_size / 2**20:.0f} MB zipped; Lambda takes at "
                           "most 250 MB unzipped and 50 MB zipped")
    return artifact


def dockerfile(handler: str) -> str:
    return (f"# Generated by `lambdalake functions package`.\nFROM {BASE_IMAGE}\n"
            "COPY requirements.txt ${LAMBDA_TASK_ROOT}/\n"
            "RUN pip install --no-cache-dir -r ${LAMBDA_TASK_ROOT}/requirements.txt "
            "--target ${LAMBDA_TASK_ROOT}\n"
            "COPY app/ ${LAMBDA_TASK_ROOT}/\n"
            f'CMD ["{handler}"]\n')


def package_image(spec: FunctionSpec, closure: Closure, out: Path, deps: Path) -> Artifact:
    """The image's Docker context (`deps` unused: the image's build installs them)."""
    context = out / spec.name
    shutil.rmtree(context, ignore_errors=True)
    copy_modules(closure.modules, context / "app")
    (context / "requirements.txt").write_text("".join(f"{r}\n" for r in closure.requirements))
    (context / "Dockerfile").write_text(dockerfile(spec.handler))
    size = sum(path.stat().st_size for path in _files(context))
    return Artifact(spec.name, "Image", context, size, None)


def install_image(context: Path, target: Path) -> None:
    """What the image's Dockerfile lays out in the task root, without Docker: its
    requirements as the same Lambda wheels, and its code."""
    requirements = (context / "requirements.txt").read_text().split()
    install_requirements(requirements, target)
    shutil.copytree(context / "app", target, dirs_exist_ok=True)


def package(template: Template, out: Path, project: str, only: Iterable[str] | None = None,
            deps: Path | None = None) -> list[Artifact]:
    """Package every function of the template (or those named in `only`); installed
    dependency sets are kept in `deps` (default `<out>/.deps`)."""
    wanted = set(only or template.functions)
    unknown = sorted(wanted - template.functions.keys())
    if unknown:
        raise PackageError(f"no function {', '.join(unknown)} in the template "
                           f"(it has {', '.join(template.functions)})")
    artifacts = []
    for name in sorted(wanted):
        spec = template.functions[name]
        closure = handler_closure(spec, project)
        build = package_image if spec.package_type == "Image" else package_zip
        artifacts.append(build(spec, closure, out, deps or out / ".deps"))
    return artifacts
