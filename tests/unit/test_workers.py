"""--workers: a worker that dies while serving takes the proxy down with a non-zero exit,
so systemd or the kubelet restarts it whole instead of it limping on with fewer workers;
and not before every other worker has exited (a container's main process leaving would
cut their drain short)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.unit.test_metrics import EXAMPLES, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
EXIT_TIMEOUT = 15.0


def children_of(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: list[int] = []
    for task in tasks.iterdir():
        children = (task / "children").read_text().split()
        found.extend(int(child) for child in children)
    return found


def start_two_workers(tmp_path: Path, stderr: int) -> tuple[subprocess.Popen[str], list[int]]:
    """egressproxy with --workers 2 on loopback ports, once /ready says 200, and its workers."""
    proxy_port, admin_port = free_port(), free_port()
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text((EXAMPLES / "linkerd-1-allow.yaml").read_text())
    environment = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [
        sys.executable, "-m", "egressproxy", "run", "--allow-root", "--workers", "2",
        "--listen", f"127.0.0.1:{proxy_port}", "--admin", f"127.0.0.1:{admin_port}",
        "--policy", str(policy_file), "--drain-timeout", "1",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=environment, stderr=stderr, stdout=subprocess.DEVNULL, text=True
    )

    def ready() -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{admin_port}/ready", timeout=2
            ) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_for("/ready", ready)
    except BaseException:
        process.kill()
        process.wait(EXIT_TIMEOUT)
        raise
    workers = children_of(process.pid)
    assert len(workers) == 2, workers
    return process, workers


def test_a_dead_worker_stops_the_proxy_with_an_error(tmp_path: Path) -> None:
    process, workers = start_two_workers(tmp_path, subprocess.PIPE)
    try:
        os.kill(workers[1], signal.SIGSTOP)  # it cannot finish until it is let go
        os.kill(workers[0], signal.SIGKILL)
        time.sleep(1.0)
        assert process.poll() is None, "the proxy left before its other worker had exited"
        os.kill(workers[1], signal.SIGCONT)
        code = process.wait(EXIT_TIMEOUT)
        assert not Path(f"/proc/{workers[1]}").exists(), "the other worker was not reaped"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(EXIT_TIMEOUT)
    _, errors = process.communicate()
    assert code == 1
    assert f"worker {workers[0]} exited (-9); stopping the others" in errors


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow or absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    """Orphaned workers would go on serving the port beside the next proxy, and its
    scrapes would miss them: they get SIGTERM when the supervisor dies, even by SIGKILL."""
    process, workers = start_two_workers(tmp_path, subprocess.DEVNULL)
    try:
        process.kill()
        process.wait(EXIT_TIMEOUT)
        deadline = time.monotonic() + EXIT_TIMEOUT
        while time.monotonic() < deadline and any(running(pid) for pid in workers):
            time.sleep(0.05)
        assert not [pid for pid in workers if running(pid)], "orphaned workers still serve"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(EXIT_TIMEOUT)
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


FAILING_WORKER = """\
import sys
from egressproxy import cli, server

def failing(max_connections):
    raise RuntimeError("injected fault in a worker")

server.descriptor_budget = failing
sys.exit(cli.main())
"""


def test_a_worker_that_fails_says_why(tmp_path: Path) -> None:
    """A worker's exception ended it by os._exit before it could be printed: the log said
    only that a worker failed, where --workers 1 prints the traceback."""
    proxy_port, admin_port = free_port(), free_port()
    script = tmp_path / "failing.py"
    script.write_text(FAILING_WORKER)
    environment = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [
        sys.executable, str(script), "run", "--allow-root", "--workers", "2",
        "--listen", f"127.0.0.1:{proxy_port}", "--admin", f"127.0.0.1:{admin_port}",
        "--policy", str(EXAMPLES / "linkerd-1-allow.yaml"),
    ]  # fmt: skip
    done = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=EXIT_TIMEOUT
    )
    assert done.returncode == 1
    assert "RuntimeError: injected fault in a worker" in done.stderr, done.stderr
    assert "Traceback" in done.stderr


FORK_REFUSED = """\
import errno
import os
import sys
from egressproxy import cli

real_fork = os.fork
forks = [0]

def refusing_fork():
    \"\"\"fork(2) as a process limit (RLIMIT_NPROC, a pod's pids limit) has it: refused
    once one worker is made.\"\"\"
    if os.getpid() == SUPERVISOR and forks[0] >= 1:
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    forks[0] += 1
    return real_fork()

SUPERVISOR = os.getpid()
os.fork = refusing_fork
sys.exit(cli.main())
"""


def test_a_worker_the_system_refuses_to_make_is_one_line_and_stops_the_others(
    tmp_path: Path,
) -> None:
    """fork() refused (a limit on processes) ended the supervisor with a traceback, the
    workers already made left to their parent-death signal."""
    proxy_port, admin_port = free_port(), free_port()
    script = tmp_path / "refused.py"
    script.write_text(FORK_REFUSED)
    environment = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [
        sys.executable, str(script), "run", "--allow-root", "--workers", "3",
        "--listen", f"127.0.0.1:{proxy_port}", "--admin", f"127.0.0.1:{admin_port}",
        "--policy", str(EXAMPLES / "linkerd-1-allow.yaml"),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _, errors = process.communicate(timeout=EXIT_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(EXIT_TIMEOUT)
    assert process.returncode == 1, errors
    assert (
        "egressproxy: --workers 3: cannot start worker 2: Resource temporarily unavailable"
        in errors
    ), errors
    assert "Traceback" not in errors, errors
    assert not processes_running(str(script)), "the worker already made outlived its supervisor"


def processes_running(argument: str) -> list[int]:
    """Processes alive (not zombies) with this argument on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in arguments and running(int(entry.name)):
            found.append(int(entry.name))
    return found
