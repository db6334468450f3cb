"""The micro-benchmarks of the pure parts still run (a changed model once broke one
unseen): each once in its smoke mode. No number is judged here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120.0


def smoke(script: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_bench_decide_times_every_policy_size_of_its_smoke_mode() -> None:
    header, *rows = smoke("bench_decide.py")
    assert "decide_connection" in header
    assert [row.split()[0] for row in rows] == ["10", "1000"]
    for row in rows:
        assert len(row.split()) == 6, row
        assert all(float(cell) > 0 for cell in row.split()[1:]), row


def test_bench_sniff_times_every_parser() -> None:
    rows = smoke("bench_sniff.py")
    names = [row.rsplit("  ", 1)[0].strip() for row in rows]
    for expected in ("parse_client_hello curl", "http1_lean.parse_request curl", "sniff chromium"):
        assert any(name.startswith(expected) for name in names), names
    for row in rows:
        assert row.endswith("µs/call"), row
        assert float(row.split()[-2]) > 0, row


def test_a_benchmark_run_that_measured_nothing_of_the_proxy_fails() -> None:
    """Refused requests, a result of 0 and idle connections left unanswered fail the run
    (and so the smoke test); they made rows that only the notes called invalid."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from harness import invalid

    assert invalid({"value": 7000.0, "non_2xx": 0}, 5000) == []
    assert invalid({"value": 2.2, "connections": 5000}, 5000) == []
    assert invalid({"value": 0.0, "connections": 100}, 100) == []  # idle: pages are shared
    assert len(invalid({"value": 7000.0, "non_2xx": 25000}, 5000)) == 1
    assert len(invalid({"value": 0.0}, 5000)) == 1
    assert len(invalid({"value": 2.2, "connections": 4999}, 5000)) == 1
