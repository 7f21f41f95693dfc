"""The package as a user gets it: the wheel built, installed (not editable) into a fresh
virtual environment outside the repository, and run from a folder whose own `batch.py`,
`speed.py`, `serving.py` and `functions.py` would shadow the parts if anything imported them by
their bare names."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_flow import Flow, batch_run, recompute, send_synthetic

REPO = Path(__file__).resolve().parents[1]
SHADOWS = ("batch", "speed", "serving", "functions")


def run(*argv: object, cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin` folder of a fresh virtual environment holding the wheel and its core deps."""
    root = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "build", "--wheel", "--outdir", root / "dist", REPO)
    wheel = next((root / "dist").glob("lambdalake-*.whl"))
    run(getattr(sys, "_base_executable", sys.executable), "-m", "venv", root / "venv")
    run(root / "venv" / "bin" / "pip", "install", "-q", wheel)
    return root / "venv" / "bin"


@pytest.fixture(scope="module")
def installed_with_spark(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second fresh environment: the same wheel (not editable), and the extras' packages
    taken from the test environment (pyspark is 400 MB: not downloaded twice)."""
    root = tmp_path_factory.mktemp("wheel-spark")
    run(getattr(sys, "_base_executable", sys.executable), "-m", "venv", root / "venv")
    site = next((root / "venv" / "lib").glob("python3.*/site-packages"))
    ours = [path for path in sys.path if path.endswith("site-packages")]
    (site / "test-env.pth").write_text("".join(f"{path}\n" for path in ours))
    wheel = next((installed.parent.parent / "dist").glob("lambdalake-*.whl"))
    run(root / "venv" / "bin" / "pip", "install", "-q", "--no-deps", wheel)
    return root / "venv" / "bin"


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    """A working folder with modules named like the parts, each failing loudly on import."""
    for name in SHADOWS:
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py')\n")
    return tmp_path


def test_the_installed_wheel_runs_the_whole_flow(installed: Path, user_folder: Path) -> None:
    assert "lambdalake" in run(installed / "lambdalake", "--version", cwd=user_folder)
    flow = Flow(user_folder, bin_dir=installed)
    flow.start()
    try:
        pageviews, _ = recompute(send_synthetic(flow, 500, seed=11))
        answer = flow.wait_for(dict(pageviews), "pageviews_by_url_hour", "url", "pageviews")
        assert answer == pageviews
        time.sleep(1.5)  # past a slice boundary, so the batch has a cut
        rows = batch_run(flow)["rows"]
        assert {r["url"]: r["pageviews"] for r in rows} == pageviews
    finally:
        flow.stop()


@pytest.mark.long
@pytest.mark.spark
def test_the_installed_wheel_runs_the_spark_engine(
    installed_with_spark: Path, user_folder: Path
) -> None:
    """The Spark engine's jar fetch is a package resource: it runs outside the repository."""
    flow = Flow(user_folder, bin_dir=installed_with_spark)
    flow.start()
    try:
        pageviews, _ = recompute(send_synthetic(flow, 300, seed=12))
        time.sleep(1.5)
        rows = batch_run(flow, "--engine", "spark")["rows"]
        assert {r["url"]: r["pageviews"] for r in rows} == pageviews
    finally:
        flow.stop()


def test_a_missing_extra_is_one_line_naming_it(installed: Path, user_folder: Path) -> None:
    """The core install has no pyspark: the Spark engine says which extra to install."""
    done = subprocess.run([installed / "lambdalake", "batch", "run", "--engine", "spark"],
                          capture_output=True, text=True, cwd=user_folder, timeout=120,
                          env={"LAMBDALAKE_HOME": str(user_folder / "home"), "PATH": "/usr/bin"})
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "pip install 'lambdalake[spark]'" in done.stderr
    assert "Traceback" not in done.stderr
