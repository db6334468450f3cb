"""The benchmark's network world: two namespaces, the redirect, the upstream servers.

client namespace  (proxies, wrk, iperf3 client; nat OUTPUT REDIRECT to :15001)
   198.18.0.1 ──veth── 198.18.0.2   upstream namespace
                                     203.0.113.10  nginx :80 :443, iperf3 :5201
                                     203.0.113.11  idle-connection server :443

Everything made here is owned by one World and undone by World.close(): the
processes it started (by PID, children included), the namespaces (which take
their iptables rules and sysctls with them) and the /etc/netns hosts file.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

T = TypeVar("T")

CLIENT_LINK_IP = "198.18.0.1"
UPSTREAM_LINK_IP = "198.18.0.2"
WEB_IP = "203.0.113.10"
IDLE_IP = "203.0.113.11"
UPSTREAM_NETWORK = "203.0.113.0/24"
HOSTNAME = "bench.example"
PROXY_PORT = 15001
ADMIN_PORT = 4191
IPERF_PORT = 5201
SMALL_FILE = "100b"
LARGE_FILE = "100m"
LARGE_FILE_BYTES = 100 * 1024 * 1024
PROXY_CPU = "1"
LOAD_CPU = "0"
PROXY_USER = "egressproxy"
REDIRECT_CHAIN = "BENCH_REDIRECT"
STOP_GRACE = 5.0
READY_TIMEOUT = 20.0
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
user nobody nogroup;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  ssl_session_cache off;
  ssl_session_tickets off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  default_type application/octet-stream;
  server {{
    listen {web}:80 backlog=4096;
    listen {web}:443 ssl backlog=4096;
    server_name {host};
    ssl_certificate {tmp}/cert.pem;
    ssl_certificate_key {tmp}/key.pem;
    root {tmp}/www;
    location /{small}/ {{
      try_files /{small} =404;
    }}
  }}
}}
"""


def run(command: Sequence[str], *, timeout: float = 30.0, check: bool = True) -> str:
    """Run a short command to completion; its stdout."""
    done = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"


def descendants(pid: int) -> list[int]:
    """pid and every living process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        if Path(f"/proc/{current}").exists():
            tree.append(current)
        queue.extend(children.get(current, []))
    return tree


def in_namespace(ns: str, function: Callable[[], T]) -> T:
    """Run function on a fresh thread that first joins network namespace ns.

    A socket made there keeps its namespace for life (Python 3.11 has no os.setns).
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            with open(f"/run/netns/{ns}", "rb") as handle:
                if _libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, os.strerror(error))
            outcome.append(function())
        except BaseException as error:  # re-raised on the caller's thread below
            failure.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(READY_TIMEOUT)
    if failure:
        raise failure[0]
    if not outcome:
        raise TimeoutError(f"no answer from namespace {ns}")
    return outcome[0]


def http_get(ns: str, port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path inside ns (admin servers): status and body."""

    def fetch() -> tuple[int, str]:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode(errors="replace")

    return in_namespace(ns, fetch)


def remove_leftovers() -> None:
    """Namespaces of an earlier run that was killed before it could clean up (its PID is gone)."""
    for line in run(["ip", "netns", "list"]).splitlines():
        found = re.match(r"(epb(\d+)-(client|upstream))\b", line)
        if found and not Path(f"/proc/{found[2]}").exists():
            run(["ip", "netns", "delete", found[1]], check=False)
            shutil.rmtree(Path("/etc/netns") / found[1], ignore_errors=True)


@dataclass
class Started:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class World:
    tag: str = field(default_factory=lambda: f"epb{os.getpid()}")
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="egressproxy-bench-")))
    processes: list[Started] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    redirect_on: bool = False

    @property
    def client_ns(self) -> str:
        return f"{self.tag}-client"

    @property
    def upstream_ns(self) -> str:
        return f"{self.tag}-upstream"

    @property
    def hosts_dir(self) -> Path:
        return Path("/etc/netns") / self.client_ns

    # -- building -------------------------------------------------------------

    def build(self, repo: Path) -> None:
        remove_leftovers()
        os.chmod(self.tmp, 0o755)
        self._copy_package(repo)
        self._make_namespaces()
        self._make_files()
        self.start(
            "nginx",
            self.upstream_ns,
            LOAD_CPU,
            ["nginx", "-c", str(self.tmp / "nginx.conf"), "-e", str(self.tmp / "nginx-error.log")],
        )
        self.start(
            "iperf3-server",
            self.upstream_ns,
            LOAD_CPU,
            ["iperf3", "-s", "-B", WEB_IP, "-p", str(IPERF_PORT)],
        )
        self.start(
            "idle-server",
            self.upstream_ns,
            LOAD_CPU,
            [sys.executable, str(Path(__file__).with_name("idle.py")), "serve", IDLE_IP, "443"],
        )
        for port in (80, 443, IPERF_PORT):
            self.wait_listening(self.upstream_ns, port)

    def _copy_package(self, repo: Path) -> None:
        """A world-readable snapshot of the package (and the floor proxies and the sketch), for
        the proxy's uid."""
        shutil.copytree(
            repo / "egressproxy",
            self.tmp / "pythonpath" / "egressproxy",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for script in ("floors.py", "sketch.py"):
            shutil.copy(Path(__file__).with_name(script), self.tmp / "pythonpath")
        run([sys.executable, "-m", "compileall", "-q", str(self.tmp / "pythonpath")])
        for path in (self.tmp / "pythonpath").rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (self.tmp / "pythonpath").chmod(0o755)

    def _make_namespaces(self) -> None:
        for ns in (self.client_ns, self.upstream_ns):
            run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
        client, upstream = self.client_ns, self.upstream_ns
        veth_client, veth_upstream = f"{self.tag}c", f"{self.tag}u"
        run(
            [
                "ip",
                "link",
                "add",
                veth_client,
                "netns",
                client,
                "type",
                "veth",
                "peer",
                "name",
                veth_upstream,
                "netns",
                upstream,
            ]
        )
        steps = [
            (client, ["ip", "link", "set", "lo", "up"]),
            (client, ["ip", "addr", "add", f"{CLIENT_LINK_IP}/30", "dev", veth_client]),
            (client, ["ip", "link", "set", veth_client, "up"]),
            (client, ["ip", "route", "add", UPSTREAM_NETWORK, "via", UPSTREAM_LINK_IP]),
            (upstream, ["ip", "link", "set", "lo", "up"]),
            (upstream, ["ip", "addr", "add", f"{UPSTREAM_LINK_IP}/30", "dev", veth_upstream]),
            (upstream, ["ip", "addr", "add", f"{WEB_IP}/32", "dev", "lo"]),
            (upstream, ["ip", "addr", "add", f"{IDLE_IP}/32", "dev", "lo"]),
            (upstream, ["ip", "link", "set", veth_upstream, "up"]),
            (upstream, ["ip", "route", "add", f"{CLIENT_LINK_IP}/32", "dev", veth_upstream]),
        ]
        for ns in (client, upstream):
            for sysctl in (
                "net.ipv4.ip_local_port_range=1024 65000",
                "net.ipv4.ip_local_reserved_ports=16384-32767",
                "net.ipv4.tcp_tw_reuse=1",
                "net.core.somaxconn=8192",
                "net.ipv4.tcp_max_syn_backlog=8192",
                # Timestamps without the per-address-pair random offset. The redirect
                # brings connections to different original destinations onto one
                # listener address, so a TIME_WAIT there can have seen timestamps of
                # another offset than the next SYN from the same client port: the SYN
                # fails PAWS and waits a second for its retransmission. From round 3 on
                # this halved new connections per second through every proxy (nstat:
                # PAWSTimewait as many as TCPSynRetrans); without the offset, none.
                "net.ipv4.tcp_timestamps=2",
            ):
                steps.append((ns, ["sysctl", "-q", "-w", sysctl]))
        uid = self.proxy_uid()
        steps += [
            (client, ["iptables", "-t", "nat", "-N", REDIRECT_CHAIN]),
            (
                client,
                [
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    REDIRECT_CHAIN,
                    "-m",
                    "owner",
                    "--uid-owner",
                    str(uid),
                    "-j",
                    "RETURN",
                    "-m",
                    "comment",
                    "--comment",
                    "the proxies' own upstream connections",
                ],
            ),
            (
                client,
                [
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    REDIRECT_CHAIN,
                    "-p",
                    "tcp",
                    "-d",
                    UPSTREAM_NETWORK,
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    str(PROXY_PORT),
                ],
            ),
        ]
        for ns, command in steps:
            run(["ip", "netns", "exec", ns, *command])
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        (self.hosts_dir / "hosts").write_text(
            f"127.0.0.1 localhost\n{WEB_IP} {HOSTNAME}\n{IDLE_IP} idle.{HOSTNAME}\n"
        )

    def _make_files(self) -> None:
        www = self.tmp / "www"
        www.mkdir()
        (www / SMALL_FILE).write_bytes(b"x" * 99 + b"\n")
        with open(www / LARGE_FILE, "wb") as large:
            block = os.urandom(1024 * 1024)
            for _ in range(LARGE_FILE_BYTES // len(block)):
                large.write(block)
        for path in (www, www / SMALL_FILE, www / LARGE_FILE):
            path.chmod(0o755 if path.is_dir() else 0o644)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        (self.tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.tmp / "key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (self.tmp / "key.pem").chmod(0o600)
        (self.tmp / "nginx.conf").write_text(
            NGINX_CONF.format(tmp=self.tmp, web=WEB_IP, host=HOSTNAME, small=SMALL_FILE)
        )

    @staticmethod
    def proxy_uid() -> int:
        import pwd

        return pwd.getpwnam(PROXY_USER).pw_uid

    # -- processes ------------------------------------------------------------

    def start(
        self,
        name: str,
        ns: str,
        cpu: str,
        command: Sequence[str],
        *,
        env: dict[str, str] | None = None,
    ) -> Started:
        log = self.tmp / f"{name}.log"
        with open(log, "ab") as output:
            process = subprocess.Popen(
                ["ip", "netns", "exec", ns, "taskset", "-c", cpu, *command],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.tmp,
                start_new_session=True,
            )
        started = Started(name, process, log)
        self.processes.append(started)
        return started

    def stop(self, started: Started) -> None:
        """SIGTERM the process, wait, then SIGKILL whatever of its tree is left; by PID."""
        tree = descendants(started.process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(started.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            started.process.wait(STOP_GRACE)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            started.process.wait(STOP_GRACE)
        if started in self.processes:
            self.processes.remove(started)

    def wait_listening(self, ns: str, port: int, process: Started | None = None) -> None:
        """Until something in ns listens on TCP port (read from the namespace's /proc view)."""
        deadline = time.monotonic() + READY_TIMEOUT
        wanted = f":{port:04X} "

        def listening() -> bool:
            with open("/proc/thread-self/net/tcp") as table:
                return any(
                    line.split()[1].endswith(wanted.strip()) and line.split()[3] == "0A"
                    for line in table.readlines()[1:]
                )

        while time.monotonic() < deadline:
            if process is not None and process.process.poll() is not None:
                raise RuntimeError(f"{process.name} exited: {last_line(process.log)}")
            if in_namespace(ns, listening):
                return
            time.sleep(0.05)
        raise TimeoutError(f"nothing listens on port {port} in {ns}")

    def set_redirect(self, on: bool) -> None:
        if on == self.redirect_on:
            return
        action = "-A" if on else "-D"
        run(
            [
                "ip",
                "netns",
                "exec",
                self.client_ns,
                "iptables",
                "-t",
                "nat",
                action,
                "OUTPUT",
                "-p",
                "tcp",
                "-j",
                REDIRECT_CHAIN,
            ]
        )
        self.redirect_on = on

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        for started in reversed(list(self.processes)):
            self.stop(started)
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "delete", ns], check=False)
        self.namespaces.clear()
        shutil.rmtree(self.hosts_dir, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
