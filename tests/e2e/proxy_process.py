"""Running `egressproxy run` inside the client namespace, under the proxy's own uid.

The package is copied into a world-readable directory first: the checkout may
live under /root (mode 0700), which uid 2102 cannot enter.
"""

from __future__ import annotations

import array
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from .netns import http_get_in
from .world import PROXY_UID, STOP_TIMEOUT, LogFile, World, make_workdir, stop_process

PACKAGE_SOURCE = Path(__file__).resolve().parents[2] / "egressproxy"
ADMIN_HOST, ADMIN_PORT = "127.0.0.1", 4191
READY_TIMEOUT = 15.0
LOG_TIMEOUT = 5.0


class ProxyNotReady(RuntimeError):
    pass


class StartProxy(Protocol):
    """The `proxy` fixture: start `egressproxy run POLICY ARGS` and (by default) wait for /ready."""

    def __call__(
        self,
        policy_text: str | None = None,
        *args: str,
        ready: bool = True,
        as_root: bool = False,
        output_unread: bool = False,
    ) -> Proxy: ...


class Proxy:
    """One `egressproxy run` process (PID = the python process: ip netns exec and setpriv exec)."""

    def __init__(
        self,
        world: World,
        process: subprocess.Popen[bytes],
        log: LogFile,
        unread_pipe: int | None = None,
    ) -> None:
        self.world = world
        self.process = process
        self.log = log
        self.exit_expected = False
        self.unread_pipe = unread_pipe
        """The read end of the pipe an output_unread proxy writes to; closed by stop()."""

    def unread_output_bytes(self) -> int:
        """What the proxy wrote to its unread pipe (a full pipe holds 64 KiB)."""
        assert self.unread_pipe is not None
        count = array.array("i", [0])
        fcntl.ioctl(self.unread_pipe, termios.FIONREAD, count)
        return count[0]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log_text(self) -> str:
        return self.log.text()

    def logged(self, pattern: str, timeout: float = LOG_TIMEOUT) -> bool:
        """Whether the regex `pattern` shows in the log within `timeout`: log and access lines
        are written by a background thread, so they can trail the traffic that caused them."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log_text()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        """Send a signal without waiting (SIGHUP, or SIGTERM to watch the drain); group: to
        every process of the proxy at once, as systemd and Ctrl-C do (it leads a session)."""
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            self.exit_expected = True
        if group:
            os.killpg(self.pid, sig)
        else:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit code; raises subprocess.TimeoutExpired if it is still running."""
        self.exit_expected = True
        return self.process.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal, wait (bounded), SIGKILL if needed; the exit code (negative: killed by signal)."""
        self.exit_expected = True
        code = stop_process(self.process, sig)
        if self.unread_pipe is not None:
            os.close(self.unread_pipe)
            self.unread_pipe = None
        self.log.text()
        return code

    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        return http_get_in(self.world.client_ns, ADMIN_HOST, ADMIN_PORT, path, timeout)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.returncode is not None:
                raise ProxyNotReady(
                    f"egressproxy exited with {self.returncode} before it was ready:\n"
                    f"{self.log_text()}"
                )
            try:
                status, _ = self.admin_get("/ready", timeout=1.0)
            except OSError:
                status = 0
            if status == 200:
                return
            time.sleep(0.05)
        raise ProxyNotReady(f"GET /ready did not answer 200 within {timeout}s:\n{self.log_text()}")


class ProxyLauncher:
    """Starts proxies for one test session; holds the world-readable copy of the package."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.root = make_workdir("proxy")
        self.root.chmod(0o755)
        shutil.copytree(
            PACKAGE_SOURCE,
            self.root / "egressproxy",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        for directory, _, files in os.walk(self.root):
            Path(directory).chmod(0o755)
            for name in files:
                Path(directory, name).chmod(0o644)
        self.started = 0

    def start(
        self,
        policy_text: str | None,
        args: tuple[str, ...],
        ready: bool,
        as_root: bool = False,
        output_unread: bool = False,
    ) -> Proxy:
        """as_root runs the proxy as uid 0 (then it needs --allow-root, and --mark not to loop);
        output_unread gives it a pipe nobody reads for stdout and stderr instead of the log."""
        self.started += 1
        identity = [] if as_root else [
            "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
        ]  # fmt: skip
        command = [
            "ip", "netns", "exec", self.world.client_ns, *identity,
            sys.executable, "-m", "egressproxy", "run",
            "--admin", f"{ADMIN_HOST}:{ADMIN_PORT}", "--log-level", "debug",
        ]  # fmt: skip
        if policy_text is not None:
            policy = self.root / f"policy-{self.started}.yaml"
            policy.write_text(policy_text)
            policy.chmod(0o644)
            command += ["--policy", str(policy)]
        command += args
        log = LogFile(self.world.workdir / f"proxy-{self.started}.log")
        environment = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "PYTHONPATH": str(self.root),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        unread_pipe, output = os.pipe() if output_unread else (None, None)
        with log.path.open("wb") as log_output:
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_output if output is None else output,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    cwd=self.root,
                    start_new_session=True,
                )
            except BaseException:
                if unread_pipe is not None:
                    os.close(unread_pipe)
                raise
            finally:
                if output is not None:
                    os.close(output)
        proxy = Proxy(self.world, process, log, unread_pipe)
        if ready:
            try:
                proxy.wait_ready()
            except BaseException:
                proxy.stop(signal.SIGKILL)
                raise
        return proxy

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
