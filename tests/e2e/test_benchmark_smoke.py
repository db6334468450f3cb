"""The benchmark harness still works: one short round of every workload against every proxy.

No number is judged here (a timed assertion on a shared CI box would only be
noise); it proves the namespaces, servers, proxies and report come together.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT = 150.0

sys.path.insert(0, str(REPO / "benchmarks"))
from harness import PROXIES, WORKLOADS, applicable  # noqa: E402


def test_smoke_run_reports_every_proxy_and_workload() -> None:
    done = subprocess.run(
        [str(REPO / "benchmarks" / "run"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:3])
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| workload")
    }
    expected = {
        (workload.title, proxy.name)
        for workload in WORKLOADS
        for proxy in PROXIES
        if applicable(workload, proxy)
    }
    assert rows == expected
    for line in done.stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| workload"):
            result = line.split("|")[3].strip()
            assert not result.startswith("—"), f"no result in: {line}"
