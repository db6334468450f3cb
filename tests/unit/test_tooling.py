"""The strict tooling the project promises: mypy --strict on the package, ruff everywhere."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_mypy_strict_on_the_package() -> None:
    checked = run("mypy", "--no-incremental", "egressproxy")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_ruff_lint_and_format() -> None:
    linted = run("ruff", "check", "egressproxy", "tests", "benchmarks", "scripts/demo.py")
    assert linted.returncode == 0, linted.stdout + linted.stderr
    formatted = run("ruff", "format", "--check", "egressproxy", "tests", "benchmarks")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
