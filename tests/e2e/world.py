"""The end-to-end test world: a client namespace behind a redirect, and a fake internet.

    client ns (ep-cli-PID)                     internet ns (ep-net-PID)
    198.18.0.2, 2001:db8:0:1::2  ── veth ──  198.18.0.1, 2001:db8:0:1::1
    nat OUTPUT: tcp REDIRECT → :15001          fake hosts' addresses on lo; all of
      (not uid 2102, not loopback)             203.0.113.0/25, 2001:db8:113::/64 answer
    /etc/netns/ep-cli-PID/hosts: fake names    203.0.113.128/25, 2001:db8:114::/64 dropped
    egressproxy run (uid 2102)                 servers.py (every service, every address)

Everything is made with `ip` and `iptables-restore` and removed at teardown,
whatever happened. Names carry the creating process's PID so a later run can
tell a crashed run's leftovers (its PID is gone) from a live run's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import servers
from .certs import CertificateSet, make_pki
from .netns import call_in, connect_in, run_in

NS_PATTERN = re.compile(r"^ep-(?:cli|net)-(\d+)$")
NETNS_ETC = Path("/etc/netns")
WORKDIR_PREFIX = "egressproxy-e2e-"
WORKDIR_PATTERN = re.compile(r"^egressproxy-e2e-(\d+)-")

CLIENT_V4, INTERNET_V4 = "198.18.0.2", "198.18.0.1"
CLIENT_V6, INTERNET_V6 = "2001:db8:0:1::2", "2001:db8:0:1::1"
ANSWERING_V4, ANSWERING_V6 = "203.0.113.0/25", "2001:db8:113::/64"
DROPPED_V4, DROPPED_V6 = "203.0.113.128/25", "2001:db8:114::/64"
BLACKHOLE_V4, BLACKHOLE_V6 = "203.0.113.200", "2001:db8:114::200"
"""Addresses whose packets the internet silently drops: upstream connect timeouts."""

PROXY_UID = 2102
"""Linkerd's proxy uid; needs no passwd entry."""
PROXY_PORT = 15001
REDIRECT_CHAIN = "EGRESSPROXY_TEST_OUTPUT"

REQUIRED_TOOLS = ("ip", "iptables-restore", "ip6tables-restore", "setpriv", "curl", "openssl")
SERVERS_READY_TIMEOUT = 15.0
COMMAND_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class FakeHost:
    name: str
    v4: str
    v6: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.v4, self.v6) if self.v6 else (self.v4,)

    def address(self, family: str) -> str:
        """The "v4" or "v6" address."""
        if family == "v4":
            return self.v4
        if family == "v6" and self.v6 is not None:
            return self.v6
        raise LookupError(f"{self.name} has no {family} address")


FAKE_HOSTS = (
    FakeHost("httpbin.org", "203.0.113.10", "2001:db8:113::10", ("www.httpbin.org",)),
    FakeHost("github.com", "203.0.113.20", "2001:db8:113::20", ("api.github.com",)),
    FakeHost("google.com", "203.0.113.30", None, ("www.google.com",)),
    FakeHost("example.test", "203.0.113.40", "2001:db8:113::40", ("www.example.test",)),
    FakeHost("internal-egress.egress-test.svc.cluster.local", "203.0.113.50"),
)
"""Names resolved in the client namespace; every one has a certificate from the test CA."""

SERVICE_PORTS = (
    servers.HTTP_PORT,
    servers.HTTPS_PORT,
    *servers.BANNER_PORTS,
    servers.ECHO_PORT,
    servers.HASH_PORT,
    servers.SOURCE_PORT,
    servers.SINK_PORT,
)


class WorldError(RuntimeError):
    """The machine cannot build the test world (not root, tools missing, no namespaces)."""


def _run(argv: Sequence[str], input: bytes | None = None) -> None:
    try:
        subprocess.run(argv, input=input, capture_output=True, timeout=COMMAND_TIMEOUT, check=True)
    except FileNotFoundError as error:
        raise WorldError(f"`{argv[0]}` is not installed: {error}") from None
    except subprocess.CalledProcessError as error:
        stderr = error.stderr.decode(errors="replace").strip()
        raise WorldError(f"`{' '.join(argv)}` failed: {stderr}") from None


def preflight_problem() -> str:
    """Why this machine cannot run the e2e tests, or ""."""
    if os.geteuid() != 0:
        return "the e2e tests need root (network namespaces, iptables, setpriv)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        packages = "iproute2 iptables util-linux curl openssl"
        return f"the e2e tests need {', '.join(missing)} (apt-get install {packages})"
    return ""


def raise_open_file_limit() -> None:
    """Thousands of concurrent test connections need thousands of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespace_names() -> list[str]:
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True
    ).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def _kill_namespace_processes(ns: str) -> None:
    """Leftover servers and proxies of a crashed run, found by the namespace they hold."""
    pids = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    ).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=COMMAND_TIMEOUT)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def _left_behind(pid: int) -> bool:
    """Made by a run that is gone (a PID equal to ours was reused: that run is gone too)."""
    return pid == os.getpid() or not _pid_alive(pid)


def sweep_stale_leftovers() -> None:
    """Delete what a crashed run left: `ep-cli-PID` / `ep-net-PID` namespaces (with their
    processes and /etc/netns files) and `egressproxy-e2e-PID-*` temporary directories."""
    for ns in _namespace_names():
        match = NS_PATTERN.match(ns)
        if match is not None and _left_behind(int(match.group(1))):
            delete_namespace(ns)
    for path in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        match = WORKDIR_PATTERN.match(path.name)
        if match is not None and _left_behind(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def make_workdir(purpose: str) -> Path:
    """A temporary directory whose name marks this run (see sweep_stale_leftovers)."""
    return Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-{purpose}-"))


def redirect_rules(loopback: str) -> str:
    """iptables-restore text of the test redirect (until `egressproxy iptables` replaces it)."""
    return "\n".join(
        [
            "*nat",
            f":{REDIRECT_CHAIN} - [0:0]",
            f"-A OUTPUT -p tcp -j {REDIRECT_CHAIN}",
            f"-A {REDIRECT_CHAIN} -m owner --uid-owner {PROXY_UID} -j RETURN",
            f"-A {REDIRECT_CHAIN} -d {loopback} -j RETURN",
            f"-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {PROXY_PORT}",
            "COMMIT",
            "",
        ]
    )


def _drop_rules(network: str) -> str:
    return f"*raw\n-A PREROUTING -d {network} -j DROP\nCOMMIT\n"


def _write_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", *name.split(".")).write_text(value)


def _disable_dad() -> None:
    """No duplicate address detection: v6 addresses are usable at once."""
    for scope in ("all", "default"):
        _write_sysctl(f"net.ipv6.conf.{scope}.accept_dad", "0")


class LogFile:
    """A child's log, still readable after the world's directory is gone (late reports)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_text = ""

    def text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            self.last_text = self.path.read_text(errors="replace")
        return self.last_text


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    """Signal one process we started (by PID), wait, SIGKILL if it will not go."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
    return process.returncode


@dataclass
class World:
    client_ns: str
    internet_ns: str
    workdir: Path
    pki: CertificateSet
    hosts: dict[str, FakeHost] = field(default_factory=lambda: {h.name: h for h in FAKE_HOSTS})
    servers: subprocess.Popen[bytes] | None = None
    servers_log: LogFile | None = None

    @property
    def ca_cert(self) -> Path:
        return self.pki.ca_cert

    def host(self, name: str) -> FakeHost:
        return self.hosts[name]

    # -- acting from the client namespace --

    def run(
        self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return run_in(self.client_ns, argv, timeout, input)

    def curl(
        self, *args: str, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[bytes]:
        """curl in the client namespace, trusting the test CA, bounded by --max-time."""
        argv = ["curl", "-sS", "--max-time", str(timeout - 1), "--cacert", str(self.ca_cert), *args]
        return self.run(argv, timeout)

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        return connect_in(self.client_ns, host, port, timeout)

    def tls_context(self) -> ssl.SSLContext:
        """A client context trusting only the test CA."""
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def servers_log_text(self) -> str:
        return self.servers_log.text() if self.servers_log else ""

    # -- the redirect --

    def install_redirect(self) -> None:
        """The test redirect (installed by the world fixture; see redirect_rules)."""
        _restore(self.client_ns, "iptables-restore", redirect_rules("127.0.0.0/8"))
        _restore(self.client_ns, "ip6tables-restore", redirect_rules("::1/128"))


def _ip(ns: str, command: str) -> None:
    """`ip -n NS COMMAND` (COMMAND split on spaces: no quoting needed for these)."""
    _run(["ip", "-n", ns, *command.split()])


def _restore(ns: str, tool: str, rules: str) -> None:
    _run(["ip", "netns", "exec", ns, tool, "--noflush"], rules.encode())


def _build_network(world: World) -> None:
    client, internet = world.client_ns, world.internet_ns
    for ns in (client, internet):
        _run(["ip", "netns", "add", ns])
        call_in(ns, _disable_dad)
    _ip(client, f"link add eth0 type veth peer name eth0 netns {internet}")
    for ns, v4, v6 in ((client, CLIENT_V4, CLIENT_V6), (internet, INTERNET_V4, INTERNET_V6)):
        _ip(ns, "link set lo up")
        _ip(ns, f"addr add {v4}/24 dev eth0")
        _ip(ns, f"addr add {v6}/64 dev eth0 nodad")
        _ip(ns, "link set eth0 up")
    _ip(client, f"route add default via {INTERNET_V4}")
    _ip(client, f"-6 route add default via {INTERNET_V6}")
    for host in world.hosts.values():
        for address in host.addresses:
            _ip(internet, f"addr add {address}/{128 if ':' in address else 32} dev lo")
    _ip(internet, f"route add local {ANSWERING_V4} dev lo")
    _ip(internet, f"-6 route add local {ANSWERING_V6} dev lo")
    _restore(internet, "iptables-restore", _drop_rules(DROPPED_V4))
    _restore(internet, "ip6tables-restore", _drop_rules(DROPPED_V6))


def _write_client_etc(world: World) -> None:
    """Files `ip netns exec` binds over /etc in the client namespace: the fake names."""
    etc = NETNS_ETC / world.client_ns
    etc.mkdir(parents=True, exist_ok=True)
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    for host in world.hosts.values():
        lines += [f"{address} {' '.join(host.names)}" for address in host.addresses]
    (etc / "hosts").write_text("\n".join(lines) + "\n")
    if Path("/etc/resolv.conf").exists():
        # Names not in hosts are asked of the fake internet, which has no DNS: a quick failure.
        (etc / "resolv.conf").write_text(f"nameserver {INTERNET_V4}\n")
    for path in (etc, etc / "hosts"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _start_servers(world: World) -> None:
    config = {
        "hosts": [
            {
                "name": host.name,
                "names": list(host.names),
                "addresses": list(host.addresses),
                "cert": str(world.pki.hosts[host.name].cert),
                "key": str(world.pki.hosts[host.name].key),
            }
            for host in world.hosts.values()
        ]
    }
    config_path = world.workdir / "servers.json"
    config_path.write_text(json.dumps(config, indent=1))
    world.servers_log = LogFile(world.workdir / "servers.log")
    with world.servers_log.path.open("wb") as log:
        command = [sys.executable, servers.__file__, "--config", str(config_path)]
        world.servers = subprocess.Popen(
            ["ip", "netns", "exec", world.internet_ns, *command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for_servers(world: World) -> None:
    """Every service answers on every host address, reached from the client namespace."""
    targets = [
        (address, port)
        for host in world.hosts.values()
        for address in host.addresses
        for port in SERVICE_PORTS
    ]
    deadline = time.monotonic() + SERVERS_READY_TIMEOUT
    while targets:
        assert world.servers is not None
        if world.servers.poll() is not None:
            raise WorldError(
                f"servers.py exited with {world.servers.returncode}:\n{world.servers_log_text()}"
            )
        if time.monotonic() > deadline:
            raise WorldError(f"servers not answering on {targets}:\n{world.servers_log_text()}")
        targets = call_in(world.client_ns, functools.partial(_not_accepting, targets))
        if targets:
            time.sleep(0.05)


def _not_accepting(targets: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [target for target in targets if not _accepts(*target)]


def _accepts(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect((host, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def built_world() -> Iterator[World]:
    """The whole world for one test session; torn down whatever happens inside."""
    problem = preflight_problem()
    if problem:
        raise WorldError(problem)
    raise_open_file_limit()
    sweep_stale_leftovers()
    pid = os.getpid()
    workdir = make_workdir("world")
    world: World | None = None
    try:
        pki = make_pki(
            workdir,
            {host.name: (list(host.names), list(host.addresses)) for host in FAKE_HOSTS},
        )
        world = World(f"ep-cli-{pid}", f"ep-net-{pid}", workdir, pki)
        _build_network(world)
        _write_client_etc(world)
        _start_servers(world)
        _wait_for_servers(world)
        world.install_redirect()
        yield world
    finally:
        if world is not None:
            if world.servers is not None:
                stop_process(world.servers)
                world.servers_log_text()
            for ns in (world.client_ns, world.internet_ns):
                delete_namespace(ns)
        shutil.rmtree(workdir, ignore_errors=True)
