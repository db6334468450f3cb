"""What stops the proxy before it serves: said in one line, never a traceback."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from egressproxy.cli import non_negative_int, positive_int

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
    assert "'sometimes' is not one of off, log, enforce" in refused.stderr


def test_help_names_the_values_of_each_choice() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "egressproxy", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert shown.returncode == 0
    for choice in ("{off,log,enforce}", "{allow,deny}", "{text,json}"):
        assert choice in shown.stdout


def test_whole_numbers_are_decimal_or_hexadecimal() -> None:
    assert non_negative_int("010") == 10
    assert non_negative_int("0x539") == 1337
    assert positive_int("0X2a") == 42
    for text in ("1e3", "0o17", "-0x1", "ten"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a whole number"):
            non_negative_int(text)
