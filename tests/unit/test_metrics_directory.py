"""PROMETHEUS_MULTIPROC_DIR preset in the environment: one worker keeps its metrics in memory
and writes nothing there; --workers N makes its own directory inside it and removes it at
exit; a directory it cannot use is one line on stderr, never a traceback."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from egressproxy import metrics
from tests.unit.test_metrics import EXAMPLES, REPO, admin_get, free_port, only, parsed, wait_for

EXIT_TIMEOUT = 15.0
STALE = b"not a metrics file: another run's or program's, never read nor removed"


def start(tmp_path: Path, workers: int, preset: Path) -> tuple[subprocess.Popen[str], int]:
    """The proxy on loopback ports with PROMETHEUS_MULTIPROC_DIR=preset and its own TMPDIR."""
    admin_port = free_port()
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text((EXAMPLES / "linkerd-1-allow.yaml").read_text())
    temporary = tmp_path / "tmp"
    temporary.mkdir(exist_ok=True)
    environment = {
        **os.environ,
        "TMPDIR": str(temporary),
        "PYTHONPATH": str(REPO),
        "PROMETHEUS_MULTIPROC_DIR": str(preset),
    }
    command = [
        sys.executable, "-m", "egressproxy", "run", "--allow-root", "--workers", str(workers),
        "--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{admin_port}",
        "--policy", str(policy_file), "--drain-timeout", "1",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    return process, admin_port


def serve_until_ready(process: subprocess.Popen[str], admin_port: int) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the proxy exited ({process.returncode}): {process.communicate()[1]}")
        try:
            return admin_get(admin_port, "/ready")[0] == 200
        except OSError:
            return False

    wait_for("/ready", ready)


def stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, errors = process.communicate(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        _, errors = process.communicate(timeout=EXIT_TIMEOUT)
    return errors


def with_stale_file(preset: Path) -> Path:
    preset.mkdir()
    stale = preset / "counter_1.db"
    stale.write_bytes(STALE)
    return stale


@pytest.mark.parametrize("exists", [True, False], ids=["directory", "missing"])
def test_one_worker_writes_no_metric_files(tmp_path: Path, exists: bool) -> None:
    preset = tmp_path / "multiproc"
    if exists:
        stale = with_stale_file(preset)
    process, admin_port = start(tmp_path, 1, preset)
    try:
        serve_until_ready(process, admin_port)
        samples = parsed(admin_get(admin_port, "/metrics")[2])
        assert only(samples, "egress_policy_generation") == ({}, 1)
        if exists:
            assert list(preset.iterdir()) == [stale]
    finally:
        errors = stop(process)
    assert process.returncode == 0, errors
    assert "Traceback" not in errors
    if exists:
        assert list(preset.iterdir()) == [stale] and stale.read_bytes() == STALE
    else:
        assert not preset.exists()
    assert not list((tmp_path / "tmp").iterdir())


def test_workers_make_their_directory_inside_it_and_remove_it(tmp_path: Path) -> None:
    preset = tmp_path / "multiproc"
    stale = with_stale_file(preset)
    process, admin_port = start(tmp_path, 2, preset)
    try:
        serve_until_ready(process, admin_port)
        samples = parsed(admin_get(admin_port, "/metrics")[2])
        assert only(samples, "egress_policy_generation") == ({}, 1)
        (own,) = preset.glob("egressproxy-metrics-*")
        assert list(own.glob("*.db"))
        assert sorted(preset.iterdir()) == sorted([stale, own])
        assert not list((tmp_path / "tmp").iterdir())
    finally:
        errors = stop(process)
    assert process.returncode == 0, errors
    assert list(preset.iterdir()) == [stale] and stale.read_bytes() == STALE


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("missing", "No such file or directory"), ("file", "Not a directory")],
)
def test_workers_name_a_directory_they_cannot_use(tmp_path: Path, kind: str, reason: str) -> None:
    preset = tmp_path / "multiproc"
    if kind == "file":
        preset.write_bytes(STALE)
    process, _ = start(tmp_path, 2, preset)
    try:
        process.wait(EXIT_TIMEOUT)
    finally:
        errors = stop(process)
    assert (process.returncode, errors) == (
        2,
        "egressproxy: cannot make the metrics directory in "
        f"PROMETHEUS_MULTIPROC_DIR={preset}: {reason}\n",
    )


def test_workers_without_any_temporary_directory_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only root filesystem (no writable /tmp at all): one line, not a traceback."""
    monkeypatch.delenv(metrics.MULTIPROCESS_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: ["/nonexistent-tmp"])
    with pytest.raises(OSError, match=r"^cannot make the metrics directory in TMPDIR, /tmp"):
        metrics.keep_values(2)


def a_run_directory(preset: Path, name: str, *, lock: bool) -> Path:
    """A metrics directory as a run makes one, with a counter file (and its lock file)."""
    directory = preset / (metrics.METRICS_DIRECTORY_PREFIX + name)
    directory.mkdir()
    (directory / "counter_4242.db").write_bytes(STALE)
    if lock:
        (directory / metrics.OWNER_LOCK).touch()
    return directory


def lock_is_free(directory: Path) -> bool:
    with open(directory / metrics.OWNER_LOCK, "rb") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(lock, fcntl.LOCK_UN)
        return True


def test_the_directory_of_a_killed_run_is_removed_a_live_ones_kept(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL leaves its directory: the next run removes it once
    its lock is free. A live run's (its lock held), and one without a lock file (not made
    by a run of ours), stay."""
    preset = tmp_path / "multiproc"
    stale = with_stale_file(preset)
    killed = a_run_directory(preset, "killed", lock=True)
    live = a_run_directory(preset, "live", lock=True)
    foreign = a_run_directory(preset, "foreign", lock=False)
    with open(live / metrics.OWNER_LOCK, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        first, admin_port = start(tmp_path, 2, preset)
        try:
            serve_until_ready(first, admin_port)
            assert not killed.exists()
            (own,) = set(preset.glob("egressproxy-metrics-*")) - {live, foreign}
            assert sorted(preset.iterdir()) == sorted([stale, live, foreign, own])
            first.kill()  # the supervisor; its workers end with it, and its lock is free
            first.wait(EXIT_TIMEOUT)
            assert not lock_is_free(live)
            wait_for("the killed run's workers to end", lambda: lock_is_free(own))
        finally:
            stop(first)
        second, admin_port = start(tmp_path, 2, preset)
        try:
            serve_until_ready(second, admin_port)
            assert not own.exists()
        finally:
            errors = stop(second)
        assert second.returncode == 0, errors
    assert sorted(preset.iterdir()) == sorted([stale, live, foreign])
    assert (foreign / "counter_4242.db").read_bytes() == STALE


RACING_RUN = """
import fcntl, os, sys
from egressproxy import metrics

real_flock = fcntl.flock
raced = []

def flock_after_another_runs_cleanup(descriptor, operation):
    if not raced:  # the new run's own lock: another run's clean-up comes just before it
        raced.append(True)
        metrics._remove_dead_runs(sys.argv[1])
    return real_flock(descriptor, operation)

metrics.fcntl.flock = flock_after_another_runs_cleanup
directory = metrics.keep_values(2)
print(os.path.isdir(directory), os.path.basename(directory), sorted(os.listdir(sys.argv[1])))
"""


def test_a_run_starting_beside_another_is_not_taken_for_a_dead_one(tmp_path: Path) -> None:
    """Two runs starting at once in one directory: the other's clean-up came between the
    new run's making its directory and locking it, found the lock free, and removed the
    directory of a live run (whose every connection then failed on its files)."""
    preset = tmp_path / "multiproc"
    preset.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PROMETHEUS_MULTIPROC_DIR": str(preset)}
    result = subprocess.run(
        [sys.executable, "-c", RACING_RUN, str(preset)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
        check=True,
    )
    exists, name, listed = result.stdout.split(" ", 2)
    assert exists == "True", result.stdout
    assert name.startswith(metrics.METRICS_DIRECTORY_PREFIX)
    assert listed.strip() == repr([name])


def test_a_starting_directory_left_long_ago_is_removed_a_fresh_one_kept(tmp_path: Path) -> None:
    """A run killed (or failed) in the few system calls between making its directory and
    naming it left it under the starting prefix, where no clean-up looked."""
    old = tmp_path / (metrics.STARTING_DIRECTORY_PREFIX + "old")
    fresh = tmp_path / (metrics.STARTING_DIRECTORY_PREFIX + "fresh")
    for directory in (old, fresh):
        directory.mkdir()
        (directory / metrics.OWNER_LOCK).touch()
    long_ago = time.time() - 2 * metrics.STALE_STARTING_SECONDS
    os.utime(old, (long_ago, long_ago))
    metrics._remove_dead_runs(str(tmp_path))
    assert sorted(tmp_path.iterdir()) == [fresh]
