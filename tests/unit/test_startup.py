"""What stops the proxy before it serves: said in one line, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def start(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressproxy", "run", "--listen", "127.0.0.1:15999",
         "--admin", "127.0.0.1:15998", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_refuses_to_run_as_root_unless_told() -> None:
    assert os.geteuid() == 0, "the suite runs as root (CI does); this test is about uid 0"
    refused = start()
    assert refused.returncode == 2
    assert "refusing to run as root" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_invalid_policy_stops_the_start_with_file_and_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: EgressNetwork\n"
        "metadata: {name: n, namespace: ns}\nspec:\n  trafficPolicy: Sometimes\n"
    )
    refused = start("--allow-root", "--policy", str(policy))
    assert refused.returncode == 1
    assert f"{policy}:5:" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_bad_flags_are_usage_errors() -> None:
    refused = start("--allow-root", "--verify-destination", "sometimes")
    assert refused.returncode == 2
    assert "--verify-destination" in refused.stderr
