"""Reliability through the real redirect (issue 8): bounded resources, named timeouts,
faulty upstreams, vanishing clients, restarts.

Every fault scenario runs inside `unchanged(proxy)`: the proxy's open descriptors
(/proc/PID/fd) and `egress_open_connections` are read before, and must come back
to that baseline (bounded wait) after, so a leaked socket fails the test. Each
fault must also show its `error` word in the metrics and in an access-log line.
The faulty upstreams are fault_servers.py, run in the internet namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import pytest

from egressproxy.server import TASK_COUNT_INTERVAL

from . import fault_servers, servers
from .clients import (
    bytes_before_close,
    client_hello,
    closed_by_peer,
    echo_once,
    hash_until_eof,
    recv_exactly,
    recv_line,
    recv_until_eof,
    stream_sha256,
)
from .netns import NamespaceHTTPConnection, socket_in
from .proxy_process import Proxy, StartProxy, metric
from .world import BLACKHOLE_V4, NETNS_ETC, World, make_workdir, stop_process

pytestmark = pytest.mark.e2e

FAULT_ADDRESS = "203.0.113.60"
"""In the internet's answering range, owned by no fake host: only fault_servers.py listens."""
REFUSED_PORT = 81
SERVERS_READY_TIMEOUT = 15.0
SETTLE_TIMEOUT = 10.0
"""Longer than the HTTP handler's 2 s linger after an error answer."""
TIMEOUT = 10.0
LOG_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def faults(world: World) -> Iterator[str]:
    """fault_servers.py listening on FAULT_ADDRESS in the internet namespace."""
    log_path = world.workdir / "fault_servers.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                "ip", "netns", "exec", world.internet_ns,
                sys.executable, fault_servers.__file__, "--address", FAULT_ADDRESS,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + SERVERS_READY_TIMEOUT
        while b"ready" not in log_path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fault_servers.py did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield FAULT_ADDRESS
    finally:
        stop_process(process)


# --- what the proxy holds, says and logs ---------------------------------------------


def fd_count(proxy: Proxy) -> int:
    return len(os.listdir(f"/proc/{proxy.pid}/fd"))


def metrics_text(proxy: Proxy) -> str:
    status, body = proxy.admin_get("/metrics")
    assert status == 200
    return body.decode()


def open_connections(proxy: Proxy) -> float:
    return metric(metrics_text(proxy), "egress_open_connections")


def tasks_alive(proxy: Proxy) -> float:
    """The proxy's asyncio tasks, as it counted them within the last second."""
    return metric(metrics_text(proxy), "egress_event_loop_tasks")


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@dataclass(frozen=True)
class Baseline:
    fds: int
    open_connections: float
    tasks: float


def baseline_of(proxy: Proxy) -> Baseline:
    """Descriptors, open connections and tasks of a proxy at rest (admin scrapes closed too;
    tasks counted once more after the last connection closed)."""
    assert wait_until(lambda: open_connections(proxy) == 0, SETTLE_TIMEOUT)
    time.sleep(TASK_COUNT_INTERVAL + 0.1)
    tasks = min(tasks_alive(proxy), tasks_alive(proxy))
    return Baseline(min(fd_count(proxy), fd_count(proxy)), 0.0, tasks)


def assert_back_to(proxy: Proxy, baseline: Baseline, timeout: float = SETTLE_TIMEOUT) -> None:
    seen: list[tuple[int, float, float]] = []

    def settled() -> bool:
        now = (fd_count(proxy), open_connections(proxy), tasks_alive(proxy))
        seen.append(now)
        return (
            now[0] <= baseline.fds
            and now[1] == baseline.open_connections
            and now[2] <= baseline.tasks
        )

    assert wait_until(settled, timeout, 0.1), (
        f"not back to {baseline} within {timeout}s (fds, open connections, tasks): {seen[-3:]}"
    )
    assert proxy.returncode is None


@contextlib.contextmanager
def unchanged(proxy: Proxy) -> Iterator[None]:
    """The proxy holds no more descriptors or connections after the block than before."""
    baseline = baseline_of(proxy)
    yield
    assert_back_to(proxy, baseline)


def access_lines(proxy: Proxy, **fields: str) -> list[str]:
    """Access-log lines (text format) carrying every `key=value` of `fields`."""
    wanted = [f" {key}={value} " for key, value in fields.items()]
    return [
        line
        for line in proxy.log_text().splitlines()
        if " access " in line and all(word in line + " " for word in wanted)
    ]


def assert_logged(proxy: Proxy, **fields: str) -> None:
    assert wait_until(lambda: bool(access_lines(proxy, **fields)), LOG_TIMEOUT), (
        f"no access line with {fields}:\n{proxy.log_text()[-3000:]}"
    )


def http_statuses(proxy: Proxy, **labels: str) -> float:
    return metric(metrics_text(proxy), "outbound_http_route_request_statuses_total", **labels)


def tcp_closes(proxy: Proxy, **labels: str) -> float:
    return metric(metrics_text(proxy), "outbound_tcp_route_close_total", **labels)


def assert_counted(count: Callable[[], float], expected: float = 1.0) -> None:
    """Metrics are updated when a connection is accounted, just after the client saw it end."""
    assert wait_until(lambda: count() == expected, LOG_TIMEOUT), count()


# --- raw HTTP from the client namespace ------------------------------------------------


def raw_request(host: str, path: str = "/", extra: str = "") -> bytes:
    """A GET asking the proxy to close after its answer (else errors keep the connection)."""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n".encode()


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert match is not None, answer[:200]
    return int(match.group(1))


def http_exchange(world: World, address: str, port: int, request: bytes) -> bytes:
    """Send one request; everything the proxy sends until it closes (or TIMEOUT)."""
    with world.connect(address, port) as sock:
        sock.sendall(request)
        answer = bytes_before_close(sock, TIMEOUT)
    assert answer is not None, "the connection was still open"
    return answer


def http_get(world: World, address: str, port: int, path: str, host: str) -> tuple[int, bytes]:
    connection = NamespaceHTTPConnection(world.client_ns, address, port, TIMEOUT)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def reset(sock: socket.socket) -> None:
    """Close with an RST: the peer sees the connection vanish, not end."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- 1. bounded resources ----------------------------------------------------------------


def test_max_connections_pauses_accepting_and_the_backlog_is_served(
    world: World, proxy: StartProxy
) -> None:
    """At the limit, new clients wait in the kernel backlog (not refused) and are served as
    soon as others close."""
    running = proxy(None, "--max-connections", "4")
    address = world.host("httpbin.org").v4
    with contextlib.ExitStack() as stack:
        first = [stack.enter_context(world.connect(address, servers.ECHO_PORT)) for _ in range(4)]
        for index, sock in enumerate(first):
            assert echo_once(sock, b"first %d\n" % index) == b"first %d\n" % index
        waiting = [world.connect(address, servers.ECHO_PORT) for _ in range(3)]
        for sock in waiting:
            stack.callback(sock.close)
            sock.sendall(b"waiting\n")
        time.sleep(0.5)
        for sock in waiting:
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(100)
        assert open_connections(running) == 4
        for sock in first[:3]:
            sock.close()
        for sock in waiting:
            assert recv_exactly(sock, len(b"waiting\n"), TIMEOUT) == b"waiting\n"
    assert running.logged("accepting paused"), running.log_text()


OPAQUE_BYTES = bytes(range(256))
"""A payload that starts as binary protocols do (a NUL): opaque at its first byte, where a
run of letters may be the method of an HTTP request line still to come."""

UPPERCASE_FLOOD = b"A" * (100 << 10)
"""Letters without a newline: the start of a request line as far as a sniffer can tell."""


def flood_echo_port(world: World, count: int) -> list[bytes | None]:
    """`count` connections to the echo port each send UPPERCASE_FLOOD; what each got back
    before the proxy closed it (None: still open when the shared time bound ran out)."""
    address = world.host("httpbin.org").v4
    socks = [world.connect(address, servers.ECHO_PORT) for _ in range(count)]
    try:
        for sock in socks:
            sock.settimeout(TIMEOUT)
            with contextlib.suppress(ConnectionError):
                sock.sendall(UPPERCASE_FLOOD)
        deadline = time.monotonic() + TIMEOUT
        return [bytes_before_close(sock, max(0.1, deadline - time.monotonic())) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def test_uppercase_flood_without_newline_keeps_memory_bounded(
    world: World, proxy: StartProxy
) -> None:
    running = proxy()
    with unchanged(running):
        baseline = running.rss_bytes()
        flood_echo_port(world, 32)
        growth = running.rss_bytes() - baseline
    assert growth < 16 << 20, f"the proxy grew {growth >> 20} MiB for 32 x 100 KiB"


def test_letters_past_the_sniff_buffer_are_a_method_too_large(
    world: World, proxy: StartProxy
) -> None:
    """A method is any token, of any length (h11 and Go read one): 100 KiB of letters may
    be one, so past the sniff buffer they are an HTTP head too large, refused, not bytes
    relayed past the host rules."""
    running = proxy()
    address = world.host("httpbin.org").v4
    with unchanged(running), world.connect(address, servers.ECHO_PORT) as sock:
        sock.settimeout(TIMEOUT)
        with contextlib.suppress(ConnectionError):
            sock.sendall(UPPERCASE_FLOOD)
        answer = bytes_before_close(sock, TIMEOUT)
    assert answer is not None and status_of(answer) in (400, 431), answer


def test_a_request_line_without_end_is_answered_as_http(world: World, proxy: StartProxy) -> None:
    """A request line that never ends is HTTP all the same: past the sniff buffer it goes to
    the HTTP handler, which refuses the oversized head, instead of slipping through opaque."""
    running = proxy()
    address = world.host("httpbin.org").v4
    endless = b"GET /" + b"a" * (100 * 1024)
    with unchanged(running), world.connect(address, 80) as sock:
        sock.settimeout(TIMEOUT)
        with contextlib.suppress(ConnectionError):
            sock.sendall(endless)
        answer = bytes_before_close(sock, TIMEOUT)
    assert answer is not None and status_of(answer) in (400, 431), answer


def test_request_head_over_max_header_bytes_gets_431(world: World, proxy: StartProxy) -> None:
    running = proxy(None, "--max-header-bytes", "8192")
    address = world.host("httpbin.org").v4
    headers = "".join(f"x-filler-{index}: {'v' * 100}\r\n" for index in range(200))
    with unchanged(running):
        answer = http_exchange(world, address, 80, raw_request("httpbin.org", "/big", headers))
        assert status_of(answer) == 431
        small = raw_request("httpbin.org", "/small", "x-filler: 1\r\n")
        assert status_of(http_exchange(world, address, 80, small)) == 200
    assert_counted(lambda: http_statuses(running, http_status="431", error="header_too_large"))
    assert_logged(running, status="431", error="header_too_large")


def cpu_seconds(proxy: Proxy) -> float:
    """User and system CPU time the proxy has used so far."""
    fields = Path(f"/proc/{proxy.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


FD_LIMIT = 160
"""RLIMIT_NOFILE for the proxy of the descriptor test: 160 - 128 kept in reserve = 32, of
which 1/32 for one pipe (2), and 2 per connection = 15 connections."""
FD_LIMITED_CONNECTIONS = 15


def test_a_low_descriptor_limit_pauses_accepting_instead_of_failing(
    world: World, proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With few descriptors the proxy lowers its connection limit to what fits, so it never
    meets EMFILE: clients beyond it wait in the backlog (no spinning meanwhile, no crash)."""
    start_process = subprocess.Popen

    def with_fd_limit(command: list[str], **options: Any) -> subprocess.Popen[bytes]:
        limited = ["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--", *command]
        return start_process(limited, **options)

    monkeypatch.setattr(subprocess, "Popen", with_fd_limit)
    running = proxy()
    monkeypatch.undo()
    assert running.logged(f"lowered to {FD_LIMITED_CONNECTIONS}"), running.log_text()
    address = world.host("httpbin.org").v4
    with contextlib.ExitStack() as stack:
        served = [
            stack.enter_context(world.connect(address, servers.ECHO_PORT))
            for _ in range(FD_LIMITED_CONNECTIONS)
        ]
        for sock in served:
            assert echo_once(sock, b"in\n", timeout=TIMEOUT) == b"in\n"
        waiting = [stack.enter_context(world.connect(address, servers.ECHO_PORT)) for _ in range(8)]
        for sock in waiting:
            sock.sendall(b"wait\n")
        before = cpu_seconds(running)
        time.sleep(2.0)
        spent = cpu_seconds(running) - before
        assert spent < 0.5, f"the proxy used {spent:.2f}s of CPU in 2s while paused"
        for sock in waiting:
            sock.settimeout(0.1)
            with pytest.raises(TimeoutError):
                sock.recv(16)
        for sock in served[:8]:
            sock.close()
        for sock in waiting:
            assert recv_exactly(sock, 5, TIMEOUT) == b"wait\n"
    assert running.returncode is None


def fill_an_upstream_that_never_reads(world: World, running: Proxy, faults: str) -> int:
    """Write as fast as possible for 3 s to the fault server's no-read port, then reset;
    how much the proxy's RSS grew meanwhile."""
    baseline = running.rss_bytes()
    sent = 0
    chunk = OPAQUE_BYTES * 4096  # 1 MiB
    with world.connect(faults, fault_servers.NO_READ_PORT) as sock:
        sock.settimeout(0.5)
        deadline = time.monotonic() + 3.0
        with contextlib.suppress(TimeoutError):
            while time.monotonic() < deadline and sent < 256 << 20:
                sent += sock.send(chunk)
        time.sleep(0.5)
        growth = running.rss_bytes() - baseline
        reset(sock)
    assert sent < 64 << 20, f"{sent >> 20} MiB went into a connection nobody reads"
    return growth


def test_fast_writer_to_an_upstream_that_never_reads(
    world: World, proxy: StartProxy, faults: str
) -> None:
    """The relay stops reading the client when the upstream's side backs up: memory stays
    bounded and the client's sends block instead. (--idle-timeout cleans up the connection:
    see the next test for why.)"""
    running = proxy(None, "--idle-timeout", "2")
    with unchanged(running):
        growth = fill_an_upstream_that_never_reads(world, running, faults)
    assert growth < 32 << 20, f"the proxy grew {growth >> 20} MiB"


def test_client_vanishing_while_backpressured_is_noticed(
    world: World, proxy: StartProxy, faults: str
) -> None:
    """The client resets while the relay has paused reading it (its upstream reads nothing):
    the proxy must still notice, and free both sockets, long before the idle timeout."""
    running = proxy()
    with unchanged(running):
        fill_an_upstream_that_never_reads(world, running, faults)
    assert_logged(running, destination=f"{faults}:{fault_servers.NO_READ_PORT}", error="reset")


# --- 2. timeouts, each named -----------------------------------------------------------


def test_connect_timeout_is_named_for_tcp_and_http(world: World, proxy: StartProxy) -> None:
    running = proxy(None, "--connect-timeout", "0.5")
    with unchanged(running):
        with world.connect(BLACKHOLE_V4, servers.ECHO_PORT) as sock:
            sock.sendall(b"hello\n")
            assert closed_by_peer(sock, TIMEOUT)
        answer = http_exchange(world, BLACKHOLE_V4, 80, raw_request("blackhole.test"))
        assert status_of(answer) == 504
    assert_counted(lambda: tcp_closes(running, target_ip=BLACKHOLE_V4, error="connect_timeout"))
    assert_counted(lambda: http_statuses(running, http_status="504", error="connect_timeout"))
    assert_logged(
        running, destination=f"{BLACKHOLE_V4}:{servers.ECHO_PORT}", error="connect_timeout"
    )
    assert_logged(running, destination=f"{BLACKHOLE_V4}:80", status="504", error="connect_timeout")


def test_connecting_tasks_are_counted_and_none_outlives_its_client(
    world: World, proxy: StartProxy
) -> None:
    """Twenty clients wait on connects that never finish, then vanish: the task gauge saw
    each connect and returns to rest."""
    running = proxy(None, "--connect-timeout", "3")
    clients = 20
    with unchanged(running):
        at_rest = tasks_alive(running)
        sockets = [world.connect(BLACKHOLE_V4, servers.ECHO_PORT) for _ in range(clients)]
        try:
            for sock in sockets:
                sock.sendall(b"hello\n")
            assert wait_until(lambda: tasks_alive(running) >= at_rest + clients, TIMEOUT)
        finally:
            for sock in sockets:
                sock.close()


def test_sniff_timeout_lets_a_server_speak_first(world: World, proxy: StartProxy) -> None:
    running = proxy(None, "--sniff-timeout", "0.3")
    with unchanged(running), world.connect(world.host("google.com").v4, 2525) as sock:
        assert recv_line(sock, timeout=3.0) == b"220 google.com ESMTP ready\r\n"
        assert echo_once(sock, b"QUIT\r\n") == b"QUIT\r\n"
    outcomes = metric(metrics_text(running), "egress_sniff_outcomes_total", outcome="timeout")
    assert outcomes == 1


def test_slowloris_gets_408_after_the_header_timeout(world: World, proxy: StartProxy) -> None:
    running = proxy(None, "--header-timeout", "1")
    address = world.host("httpbin.org").v4
    head = raw_request("httpbin.org", "/slow", "x-trickle: " + "t" * 200 + "\r\n")
    with unchanged(running), world.connect(address, 80) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic()
        answer = b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for byte in head[:-2]:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
                if time.monotonic() - started > 3.0:
                    break
        answer = bytes_before_close(sock, TIMEOUT) or b""
        elapsed = time.monotonic() - started
    assert status_of(answer) == 408
    assert 0.9 <= elapsed < 4.0, elapsed
    assert_counted(lambda: http_statuses(running, http_status="408", error="header_timeout"))
    assert_logged(running, status="408", error="header_timeout")


def test_idle_spliced_connection_is_closed_as_idle_timeout(world: World, proxy: StartProxy) -> None:
    running = proxy(None, "--idle-timeout", "1")
    address = world.host("github.com").v4
    with unchanged(running), world.connect(address, servers.ECHO_PORT) as sock:
        assert echo_once(sock, b"then silence\n") == b"then silence\n"
        started = time.monotonic()
        assert closed_by_peer(sock, TIMEOUT)
        assert 0.9 <= time.monotonic() - started < 3.0
    assert_counted(lambda: tcp_closes(running, target_ip=address, error="idle_timeout"))
    assert_logged(running, destination=f"{address}:{servers.ECHO_PORT}", error="idle_timeout")


HUNG_LOOKUP_SECONDS = 30
"""glibc's longest wait for one DNS server (RES_MAXRETRANS): a lookup that hangs this long."""
VERIFY_TIMEOUT = 5.0
"""How long the proxy's destination verification waits for the resolver."""
DRAIN_TIMEOUT = 1.0
EXIT_MARGIN = 3.0


@pytest.fixture
def hung_lookups(world: World) -> Iterator[None]:
    """Names not in the client namespace's hosts file are asked of a black-holed address
    (dropped, no ICMP), so their lookups hang HUNG_LOOKUP_SECONDS. The file is written in
    place: `ip netns exec` binds it over /etc/resolv.conf of the processes it starts."""
    resolv_conf = NETNS_ETC / world.client_ns / "resolv.conf"
    if not resolv_conf.exists():
        pytest.skip("the world has no resolv.conf (the host has none to bind it over)")
    before = resolv_conf.read_text()
    resolv_conf.write_text(
        f"nameserver {BLACKHOLE_V4}\noptions timeout:{HUNG_LOOKUP_SECONDS} attempts:1\n"
    )
    try:
        yield
    finally:
        resolv_conf.write_text(before)


@pytest.mark.usefixtures("hung_lookups")
@pytest.mark.parametrize("asker", ["enforce", "log", "backend"])
def test_exit_does_not_wait_for_a_hung_lookup(world: World, proxy: StartProxy, asker: str) -> None:
    """SIGTERM while a name's lookup hangs (destination verification, which holds the
    request under enforce and not under log, or a route's backend Service): the proxy exits
    after its drain timeout, not when the system resolver gives up. A thread pool the
    interpreter or libuv joins at exit would hold it there."""
    drain = ("--drain-timeout", str(DRAIN_TIMEOUT))
    if asker != "backend":
        running = proxy(None, *drain, "--verify-destination", asker)
        path, host = "/get", "hung.example.test"
    else:
        backend_domain = ("--cluster-domain", "hung.example.test")
        policy = ROUTED.format(down=REFUSED_PORT)
        running = proxy(policy, *drain, "--namespace", "egress-test", *backend_domain)
        path, host = "/missing", "httpbin.org"
    with world.connect(world.host("httpbin.org").v4, 80) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        time.sleep(0.5)  # the lookup is under way
        running.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = running.wait(DRAIN_TIMEOUT + EXIT_MARGIN)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - started
    assert code == 0, f"still running {took:.1f}s after SIGTERM:\n{running.log_text()[-3000:]}"
    assert took < DRAIN_TIMEOUT + EXIT_MARGIN


@pytest.mark.usefixtures("hung_lookups")
def test_a_silent_resolver_under_log_is_unverified_not_a_mismatch(
    world: World, proxy: StartProxy
) -> None:
    """--verify-destination log while the system resolver does not answer: the request
    passes at once, not when the check gives up (5 s), and is then counted as unverified,
    not as a destination mismatch: an operator rolling out must not read a DNS outage as
    spoofing, nor have log mode hold the traffic it observes."""
    running = proxy(None, "--verify-destination", "log")
    request = raw_request("hung.example.test", "/get")
    assert status_of(http_exchange(world, world.host("httpbin.org").v4, 80, request)) == 200
    unverified = "egress_destination_unverified_total"
    assert metric(metrics_text(running), unverified) == 0.0, "answered once the check gave up"
    counted = wait_until(
        lambda: (
            metric(metrics_text(running), unverified, hostname="hung.example.test", mode="log")
            == 1.0
        ),
        VERIFY_TIMEOUT + LOG_TIMEOUT,
    )
    assert counted, running.log_text()[-3000:]
    text = metrics_text(running)
    assert metric(text, unverified) == 1.0
    assert metric(text, "egress_destination_mismatch_total") == 0.0
    assert http_statuses(running, hostname="hung.example.test", http_status="200", error="") == 1.0


# --- 3. faults survived, nothing leaked --------------------------------------------------


def test_upstream_refuses(world: World, proxy: StartProxy, faults: str) -> None:
    running = proxy()
    with unchanged(running):
        with world.connect(faults, REFUSED_PORT) as sock:
            sock.sendall(b"\x01hello\n")
            assert bytes_before_close(sock, TIMEOUT) == b""
        answer = http_exchange(world, faults, REFUSED_PORT, raw_request("refused.test"))
        assert status_of(answer) == 502
    assert_counted(lambda: tcp_closes(running, error="connect_refused"))
    assert_counted(lambda: http_statuses(running, http_status="502", error="connect_refused"))
    assert_logged(running, protocol="opaque", error="connect_refused")
    assert_logged(running, status="502", error="connect_refused")


PROHIBITED = {"v4": ("203.0.113.62", "iptables"), "v6": ("2001:db8:113::62", "ip6tables")}
"""Addresses in the internet's answering ranges that a firewall rule prohibits in a test."""
PROHIBITING_REJECT = {"v4": "icmp-host-prohibited", "v6": "icmp6-adm-prohibited"}


@contextlib.contextmanager
def firewall_prohibits(world: World, family: str) -> Iterator[str]:
    """A REJECT rule in the internet's INPUT answering TCP to one address with ICMP's
    administratively prohibited (firewalld's default); removed whatever happens."""
    address, tool = PROHIBITED[family]
    rule = ["INPUT", "-d", address, "-p", "tcp", "-j", "REJECT"]
    rule += ["--reject-with", PROHIBITING_REJECT[family]]
    subprocess.run(["ip", "netns", "exec", world.internet_ns, tool, "-I", *rule], check=True)
    try:
        yield address
    finally:
        subprocess.run(["ip", "netns", "exec", world.internet_ns, tool, "-D", *rule], check=True)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_an_upstream_a_firewall_prohibits_is_unreachable(
    world: World, proxy: StartProxy, family: str
) -> None:
    """ICMP's "administratively prohibited" is unreachable over IPv6 as over IPv4: the
    kernel gives EACCES for ICMPv6's (and for a prohibit route), EHOSTUNREACH for ICMPv4's,
    and the two are one cause, counted once as a connect error."""
    running = proxy()
    with unchanged(running), firewall_prohibits(world, family) as address:
        with world.connect(address, REFUSED_PORT) as sock:
            sock.sendall(b"\x01hello\n")
            assert bytes_before_close(sock, TIMEOUT) == b""
        answer = http_exchange(world, address, 80, raw_request("prohibited.test"))
        assert status_of(answer) == 502
    assert_counted(lambda: tcp_closes(running, target_ip=address, error="unreachable"))
    assert_counted(lambda: http_statuses(running, http_status="502", error="unreachable"))
    connect_errors = metric(metrics_text(running), "egress_upstream_connect_errors_total")
    unreachable = metric(
        metrics_text(running), "egress_upstream_connect_errors_total", error="unreachable"
    )
    assert (connect_errors, unreachable) == (2.0, 2.0)
    host = f"[{address}]" if ":" in address else address
    assert_logged(running, destination=f"{host}:{REFUSED_PORT}", error="unreachable")


def test_upstream_resets_mid_response_tcp(world: World, proxy: StartProxy, faults: str) -> None:
    running = proxy()
    with unchanged(running), world.connect(faults, fault_servers.RESET_PORT) as sock:
        sock.sendall(b"\x01give me bytes\n")
        received = bytearray()
        with contextlib.suppress(ConnectionResetError):
            received += recv_until_eof(sock, TIMEOUT)
        assert len(received) <= len(fault_servers.PARTIAL_RESPONSE)
    assert_counted(lambda: tcp_closes(running, error="reset"))
    assert_logged(running, destination=f"{faults}:{fault_servers.RESET_PORT}", error="reset")


def test_upstream_resets_mid_response_http(world: World, proxy: StartProxy, faults: str) -> None:
    """The head is already out: the client cannot get a 502 any more, so the connection is
    cut with a reset, and the client can tell the body is incomplete."""
    running = proxy()
    with unchanged(running), world.connect(faults, fault_servers.RESET_PORT) as sock:
        sock.sendall(raw_request("reset.test", "/reset"))
        received, end = received_and_end(sock)
        assert (status_of(received), end) == (200, "reset")
        assert len(received) < len(fault_servers.PARTIAL_RESPONSE) + fault_servers.PROMISED
    assert_counted(lambda: http_statuses(running, error="reset"))
    assert_logged(running, path="/reset", error="reset")


RESET_ADDRESS, RESET_PORT = "203.0.113.61", 9200
"""The test's own listener, in the internet's answering range (owned by no fake host)."""
CUT_STREAM = bytes(range(256)) * 1024
"""256 KiB: more than a socket sends at once to a client that does not read yet."""
UPGRADE_REQUEST = (
    b"GET /chat HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
)
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


@pytest.fixture
def listener(world: World) -> Iterator[socket.socket]:
    """A listening socket of the test's own on RESET_ADDRESS:RESET_PORT in the internet."""
    sock = socket_in(world.internet_ns)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((RESET_ADDRESS, RESET_PORT))
        sock.listen(8)
        sock.settimeout(TIMEOUT)
        yield sock
    finally:
        sock.close()


def recv_head(sock: socket.socket, limit: int = 4096) -> bytes:
    """An HTTP head, read a byte at a time up to its blank line (nothing past it)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        assert len(head) < limit, head
        head += recv_exactly(sock, 1, TIMEOUT)
    return head


def opened(world: World, listener: socket.socket, kind: str) -> tuple[socket.socket, socket.socket]:
    """(client, server) of a connection through the proxy, its opening exchanged: opaque
    bytes, a ClientHello with an allowed SNI (then raw bytes), or an HTTP/1 Upgrade."""
    client = world.connect(RESET_ADDRESS, RESET_PORT)
    try:
        if kind == "upgrade":
            client.sendall(UPGRADE_REQUEST)
            server, _ = listener.accept()
            assert recv_head(server).startswith(b"GET /chat HTTP/1.1\r\n")
            server.sendall(SWITCHED)
            assert recv_head(client).startswith(b"HTTP/1.1 101 ")
            return client, server
        first = client_hello(world.tls_context(), "httpbin.org") if kind == "tls" else b"\x01hi"
        client.sendall(first)
        server, _ = listener.accept()
        assert recv_exactly(server, len(first), TIMEOUT) == first
        return client, server
    except BaseException:
        client.close()
        raise


def unacknowledged(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0])


def sent_then_reset(sock: socket.socket, data: bytes) -> None:
    """Send data, wait until the other end's kernel has it all, then reset (a reset drops
    whatever the socket has not sent)."""
    sock.settimeout(TIMEOUT)
    sock.sendall(data)
    assert wait_until(lambda: unacknowledged(sock) == 0, TIMEOUT), unacknowledged(sock)
    reset(sock)


def received_and_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the peer sent, and how it ended: "reset" or "eof" (TIMEOUT bounds it)."""
    deadline = time.monotonic() + TIMEOUT
    data = bytearray()
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk


@pytest.mark.parametrize("kind", ["opaque", "tls", "upgrade"])
@pytest.mark.parametrize("resetting", ["upstream", "client"])
def test_a_reset_reaches_the_other_side_as_a_reset_after_the_bytes_before_it(
    world: World, proxy: StartProxy, listener: socket.socket, kind: str, resetting: str
) -> None:
    """One end sends 256 KiB and resets while the other reads nothing yet, so the proxy
    holds some of them when the reset comes. The other end must get every byte, and then
    a reset: an EOF would make a stream cut by a crash (a close-delimited response, an
    aborted upload) look complete. Spliced (opaque, TLS) and through an Upgrade's tunnel."""
    running = proxy()
    with unchanged(running):
        client, server = opened(world, listener, kind)
        with client, server:
            sender, receiver = (server, client) if resetting == "upstream" else (client, server)
            sent_then_reset(sender, CUT_STREAM)
            time.sleep(0.5)  # the proxy has seen the reset before the receiver reads
            received, end = received_and_end(receiver)
    assert (len(received), end) == (len(CUT_STREAM), "reset")
    assert received == CUT_STREAM
    assert_logged(running, destination=f"{RESET_ADDRESS}:{RESET_PORT}", error="reset")


@pytest.mark.parametrize("kind", ["opaque", "tls", "upgrade"])
def test_a_drain_cut_reaches_both_sides_as_a_reset(
    world: World, proxy: StartProxy, listener: socket.socket, kind: str
) -> None:
    """SIGTERM, and a stream still open when the drain timeout runs out: both ends get a
    reset when the time is up, since a FIN would let either take the cut stream for a
    complete one (a close-delimited download, an upload read to its end)."""
    running = proxy(None, "--drain-timeout", "1")
    client, server = opened(world, listener, kind)
    with client, server:
        running.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert received_and_end(client) == (b"", "reset")
        assert 0.9 <= time.monotonic() - started < 3.0
        assert received_and_end(server) == (b"", "reset")
    assert running.wait(TIMEOUT) == 0
    assert access_lines(running, destination=f"{RESET_ADDRESS}:{RESET_PORT}", error="drain")


def test_a_clean_close_still_reaches_the_other_side_as_an_eof(
    world: World, proxy: StartProxy, listener: socket.socket
) -> None:
    """The counterpart: a FIN stays a FIN, after the same bytes, and the other direction
    still works after it (half-close)."""
    running = proxy()
    with unchanged(running):
        client, server = opened(world, listener, "opaque")
        with client, server:
            server.sendall(CUT_STREAM)
            server.shutdown(socket.SHUT_WR)
            time.sleep(0.5)
            assert received_and_end(client) == (CUT_STREAM, "eof")
            client.sendall(b"still heard")
            client.shutdown(socket.SHUT_WR)
            assert received_and_end(server) == (b"still heard", "eof")
    assert_logged(running, destination=f"{RESET_ADDRESS}:{RESET_PORT}", error="-")


OPAQUE_PORT = 9300
"""One of the default --opaque-ports: the proxy connects upstream at once, sniffing nothing."""


@contextlib.contextmanager
def syns_dropped(world: World, address: str, port: int) -> Iterator[None]:
    """The internet drops SYNs to address:port while inside (a connect retries in 1 s)."""
    rule = ["INPUT", "-d", address, "-p", "tcp", "--dport", str(port), "--syn", "-j", "DROP"]
    subprocess.run(["ip", "netns", "exec", world.internet_ns, "iptables", "-I", *rule], check=True)
    try:
        yield
    finally:
        subprocess.run(
            ["ip", "netns", "exec", world.internet_ns, "iptables", "-D", *rule], check=True
        )


def test_an_upstream_reset_before_the_connect_is_seen_reaches_the_client_as_a_reset(
    world: World, proxy: StartProxy
) -> None:
    """An upstream that accepts and resets at once (a server refusing a client by address,
    a balancer with no backend) can do so before the proxy's loop sees its connect done:
    the connect then ends as a reset, and the client must get a reset as well, not the
    FIN of a stream that ended cleanly. The proxy is stopped (SIGSTOP) across the
    handshake to open that window wide; the upstream's first SYN is dropped so that the
    handshake comes (with the SYN's retry) while it is stopped."""
    running = proxy()
    listener = socket_in(world.internet_ns)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((RESET_ADDRESS, OPAQUE_PORT))
        listener.listen(8)
        listener.settimeout(TIMEOUT)
        with unchanged(running):
            with syns_dropped(world, RESET_ADDRESS, OPAQUE_PORT):
                client = world.connect(RESET_ADDRESS, OPAQUE_PORT)
                time.sleep(0.3)  # the proxy's SYN went, and was dropped
                running.send_signal(signal.SIGSTOP)
            try:
                server, _ = listener.accept()
                server.sendall(b"421 not for you\r\n")
                reset(server)
                time.sleep(0.3)  # the reset is at the proxy's socket
            finally:
                running.send_signal(signal.SIGCONT)
            with client:
                assert received_and_end(client)[1] == "reset"
    assert_counted(lambda: tcp_closes(running, target_ip=RESET_ADDRESS, error="reset"))
    assert_logged(running, destination=f"{RESET_ADDRESS}:{OPAQUE_PORT}", error="reset")


def test_upstream_stalls_tcp(world: World, proxy: StartProxy, faults: str) -> None:
    running = proxy(None, "--idle-timeout", "1")
    with unchanged(running), world.connect(faults, fault_servers.STALL_PORT) as sock:
        sock.sendall(b"\x01anyone?\n")
        assert bytes_before_close(sock, TIMEOUT) == b""
    assert_counted(lambda: tcp_closes(running, error="idle_timeout"))
    assert_logged(running, destination=f"{faults}:{fault_servers.STALL_PORT}", error="idle_timeout")


def test_upstream_stalls_http_gets_504(world: World, proxy: StartProxy, faults: str) -> None:
    """A request sent and nothing back for --idle-timeout: the proxy answers 504 itself
    (as a gateway timing out does) rather than cutting the client without a word."""
    running = proxy(None, "--idle-timeout", "1")
    with unchanged(running):
        answer = http_exchange(
            world, faults, fault_servers.STALL_PORT, raw_request("stall.test", "/stall")
        )
    assert_logged(running, path="/stall", error="idle_timeout")
    assert_counted(lambda: http_statuses(running, error="idle_timeout"))
    assert answer.startswith(b"HTTP/1.1 504 "), answer[:100]


def test_upstream_closes_early_tcp(world: World, proxy: StartProxy, faults: str) -> None:
    running = proxy()
    with unchanged(running), world.connect(faults, fault_servers.CLOSE_PORT) as sock:
        sock.sendall(b"\x01hello\n")
        assert bytes_before_close(sock, TIMEOUT) == b""
    assert_logged(running, destination=f"{faults}:{fault_servers.CLOSE_PORT}", protocol="opaque")


def test_upstream_closes_early_http_gets_502(world: World, proxy: StartProxy, faults: str) -> None:
    running = proxy()
    with unchanged(running):
        answer = http_exchange(
            world, faults, fault_servers.CLOSE_PORT, raw_request("close.test", "/close")
        )
        assert status_of(answer) == 502
    assert_counted(lambda: http_statuses(running, http_status="502", hostname="close.test"))
    lines = access_lines(running, path="/close", status="502")
    assert lines and " error=- " not in lines[0] + " ", lines


def test_upstream_truncates_the_body_http(world: World, proxy: StartProxy, faults: str) -> None:
    """Fewer body bytes than Content-Length, then FIN: the client must not see a clean end
    (a reset, after the bytes the upstream sent)."""
    running = proxy()
    with unchanged(running), world.connect(faults, fault_servers.TRUNCATE_PORT) as sock:
        sock.sendall(raw_request("truncate.test", "/truncate"))
        received, end = received_and_end(sock)
    assert (status_of(received), end) == (200, "reset")
    assert len(received) == len(fault_servers.PARTIAL_RESPONSE)
    assert_logged(running, path="/truncate", status="200")
    lines = access_lines(running, path="/truncate")
    assert " error=- " not in lines[0] + " ", lines


def test_upstream_sends_garbage_http_gets_502(world: World, proxy: StartProxy, faults: str) -> None:
    running = proxy()
    with unchanged(running):
        answer = http_exchange(
            world, faults, fault_servers.GARBAGE_PORT, raw_request("garbage.test", "/garbage")
        )
        assert status_of(answer) == 502
    assert_counted(lambda: http_statuses(running, http_status="502", error="bad_response"))
    assert_logged(running, path="/garbage", status="502", error="bad_response")


ROUTED = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {{namespace: egress-test, name: all-egress-traffic}}
spec: {{trafficPolicy: Allow}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: to-service, namespace: egress-test}}
spec:
  parentRefs:
  - {{name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 80}}
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /missing}}}}]
    backendRefs: [{{kind: Service, name: missing, namespace: egress-test, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /down}}}}]
    backendRefs: [{{kind: Service, name: internal-egress, namespace: egress-test, port: {down}}}]
"""


def test_backend_name_that_does_not_resolve(world: World, proxy: StartProxy) -> None:
    running = proxy(ROUTED.format(down=REFUSED_PORT), "--namespace", "egress-test")
    with unchanged(running):
        status, body = http_get(world, world.host("httpbin.org").v4, 80, "/missing", "httpbin.org")
        assert status in (502, 503), body
        status, _ = http_get(world, world.host("httpbin.org").v4, 80, "/get", "httpbin.org")
        assert status == 200
    assert_counted(lambda: http_statuses(running, route_name="to-service", error="dns_error"))
    assert_logged(running, path="/missing", error="dns_error")


def test_backend_that_is_down(world: World, proxy: StartProxy) -> None:
    running = proxy(ROUTED.format(down=REFUSED_PORT), "--namespace", "egress-test")
    with unchanged(running):
        status, _ = http_get(world, world.host("httpbin.org").v4, 80, "/down", "httpbin.org")
        assert status == 502
    assert_counted(
        lambda: http_statuses(
            running, route_name="to-service", http_status="502", error="connect_refused"
        )
    )
    assert_logged(running, path="/down", status="502", error="connect_refused")


def test_client_vanishes_mid_upload_tcp(world: World, proxy: StartProxy) -> None:
    running = proxy()
    address = world.host("httpbin.org").v4
    with unchanged(running):
        sock = world.connect(address, servers.HASH_PORT)
        sock.sendall(OPAQUE_BYTES * 16384)  # 4 MiB
        reset(sock)
    assert_counted(lambda: tcp_closes(running, target_ip=address, error="reset"))
    assert_logged(running, destination=f"{address}:{servers.HASH_PORT}", error="reset")


def test_client_vanishes_mid_upload_http(world: World, proxy: StartProxy) -> None:
    running = proxy()
    address = world.host("httpbin.org").v4
    head = b"POST /upload HTTP/1.1\r\nHost: httpbin.org\r\nContent-Length: %d\r\n\r\n" % (64 << 20)
    with unchanged(running):
        sock = world.connect(address, 80)
        sock.sendall(head + b"u" * (4 << 20))
        time.sleep(0.2)
        reset(sock)
    assert_counted(lambda: http_statuses(running, error="reset"))
    assert_logged(running, path="/upload", error="reset")


# --- 6. restarts lose nothing promised ------------------------------------------------------

TRANSFER = 48 << 20


def test_sigterm_completes_http_and_spliced_transfers_in_flight(
    world: World, proxy: StartProxy
) -> None:
    running = proxy(None, "--drain-timeout", "20")
    address = world.host("httpbin.org").v4
    with contextlib.ExitStack() as stack:
        responses = []
        for _ in range(3):
            connection = NamespaceHTTPConnection(world.client_ns, address, 80, 30.0)
            stack.callback(connection.close)
            connection.request("GET", f"/bytes/{TRANSFER}", headers={"Host": "httpbin.org"})
            response = connection.getresponse()
            responses.append((response, response.read(1 << 20)))
        spliced = []
        for _ in range(3):
            sock = stack.enter_context(world.connect(address, servers.SOURCE_PORT, timeout=30.0))
            sock.sendall(b"%d\n" % TRANSFER)
            spliced.append((sock, recv_exactly(sock, 1 << 20, TIMEOUT)))
        running.send_signal(signal.SIGTERM)
        assert wait_until(lambda: running.admin_get("/ready")[0] == 503, 2.0)
        with pytest.raises(ConnectionRefusedError):
            world.connect(address, servers.ECHO_PORT, timeout=2.0).close()
        for response, head in responses:
            body = head + response.read()
            assert hashlib.sha256(body).hexdigest() == stream_sha256(TRANSFER)
        for sock, head in spliced:
            assert hash_until_eof(sock, 30.0, prefix=head) == (stream_sha256(TRANSFER), TRANSFER)
    assert running.wait(TIMEOUT) == 0
    assert not access_lines(running, error="drain")


class Client(Protocol):
    """One thread's client: repeats one exchange; holds its connection between exchanges."""

    def exchange(self) -> None: ...

    def close(self) -> None: ...


class Hammer:
    """Clients in threads repeating their exchange until stopped; failures are kept."""

    def __init__(self) -> None:
        self.done = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def start(self, name: str, make_client: Callable[[], Client], count: int) -> None:
        def loop() -> None:
            client = make_client()
            deadline = time.monotonic() + 60.0
            try:
                while not self.stop.is_set() and time.monotonic() < deadline:
                    try:
                        client.exchange()
                    except (OSError, AssertionError, http.client.HTTPException) as error:
                        with self.lock:
                            self.failures.append(f"{name}: {error!r}")
                    with self.lock:
                        self.done += 1
            finally:
                client.close()

        for index in range(count):
            thread = threading.Thread(target=loop, name=f"{name} {index}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(TIMEOUT)


class KeepAliveGetter:
    """GET on one keep-alive connection (reconnecting only after a failure)."""

    def __init__(self, world: World, path: str, expected: int) -> None:
        self.connection = NamespaceHTTPConnection(
            world.client_ns, world.host("httpbin.org").v4, 80, TIMEOUT
        )
        self.path, self.expected = path, expected

    def exchange(self) -> None:
        try:
            self.connection.request("GET", self.path, headers={"Host": "httpbin.org"})
            response = self.connection.getresponse()
            body = response.read()
        except BaseException:
            self.connection.close()
            raise
        assert response.status == self.expected, (response.status, body[:100])
        assert not response.will_close, "the proxy closed a keep-alive connection"

    def close(self) -> None:
        self.connection.close()


class FreshGetter:
    """GET on a new connection each time."""

    def __init__(self, world: World, path: str, expected: int) -> None:
        self.world, self.path, self.expected = world, path, expected

    def exchange(self) -> None:
        status, body = http_get(
            self.world, self.world.host("httpbin.org").v4, 80, self.path, "httpbin.org"
        )
        assert status == self.expected, (status, body[:100])

    def close(self) -> None:
        """Nothing held between exchanges."""


class EchoRepeater:
    """Round trips on one long-lived spliced connection: it must never drop."""

    def __init__(self, world: World) -> None:
        self.sock = world.connect(world.host("github.com").v4, servers.ECHO_PORT)

    def exchange(self) -> None:
        assert echo_once(self.sock, b"steady\n") == b"steady\n"

    def close(self) -> None:
        self.sock.close()


def test_sighup_under_load_drops_nothing(world: World, proxy: StartProxy) -> None:
    running = proxy()
    hammer = Hammer()
    hammer.start("keep-alive", lambda: KeepAliveGetter(world, "/get", 200), 3)
    hammer.start("fresh", lambda: FreshGetter(world, "/get", 200), 2)
    hammer.start("splice", lambda: EchoRepeater(world), 3)
    try:
        for _ in range(10):
            time.sleep(0.2)
            running.send_signal(signal.SIGHUP)
        time.sleep(0.3)
    finally:
        hammer.finish()
    assert hammer.failures == []
    assert hammer.done > 100
    text = metrics_text(running)
    assert metric(text, "egress_policy_reloads_total", result="ok") == 10
    assert metric(text, "egress_policy_generation") == 11
    assert running.returncode is None


RELOADED = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {{name: reloaded}}
spec:
  default: allow
  rules:
  - name: probe
    hosts: [httpbin.org]
    http: [{{pathPrefix: /probe}}]
    action: {action}
"""


@contextlib.contextmanager
def replaced_policy(name: str) -> Iterator[tuple[Path, Callable[[str, int], None]]]:
    """A policy file the proxy's uid can read, and a writer that replaces it whole with a
    generation's text (a rename, as a ConfigMap update does); removed at the end."""
    directory = make_workdir(name)
    directory.chmod(0o755)
    policy = directory / "policy.yaml"

    def write(text: str, generation: int) -> None:
        staged = directory / f"staged-{generation}.yaml"
        staged.write_text(text)
        staged.chmod(0o644)
        staged.replace(policy)

    try:
        yield policy, write
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_policy_rewritten_under_load_switches_without_a_failed_request(
    world: World, proxy: StartProxy
) -> None:
    with replaced_policy("reload") as (policy, write):
        write(RELOADED.format(action="deny"), 1)
        running = proxy(None, "--policy", str(policy))
        hammer = Hammer()
        hammer.start("keep-alive", lambda: KeepAliveGetter(world, "/get", 200), 3)
        hammer.start("fresh", lambda: FreshGetter(world, "/get", 200), 2)
        try:
            for generation in range(2, 8):
                action = "allow" if generation % 2 == 0 else "deny"
                write(RELOADED.format(action=action), generation)
                assert wait_until(partial(loaded, running, generation), 5.0), (
                    f"generation {generation} never loaded"
                )
                status, _ = http_get(
                    world, world.host("httpbin.org").v4, 80, "/probe", "httpbin.org"
                )
                assert status == (200 if action == "allow" else 403)
                time.sleep(0.2)
        finally:
            hammer.finish()
        assert hammer.failures == []
        assert hammer.done > 100


def test_a_reload_decides_the_next_request_of_an_open_keep_alive_connection(
    world: World, proxy: StartProxy
) -> None:
    """Through the redirect, one keep-alive connection's requests follow each reload:
    allowed, denied, allowed again (each head sent twice, the second found again), as
    Linkerd routes each request by the routes it last heard of."""
    with replaced_policy("reload-open") as (policy, write):
        write(RELOADED.format(action="allow"), 1)
        running = proxy(None, "--policy", str(policy))
        connection = NamespaceHTTPConnection(
            world.client_ns, world.host("httpbin.org").v4, 80, TIMEOUT
        )
        statuses, sockets = [], set()
        try:
            for generation, action in enumerate(["allow", "deny", "allow"], start=1):
                if generation > 1:
                    write(RELOADED.format(action=action), generation)
                    assert wait_until(partial(loaded, running, generation), 5.0)
                for _ in range(2):
                    connection.request("GET", "/probe", headers={"Host": "httpbin.org"})
                    response = connection.getresponse()
                    response.read()
                    statuses.append(response.status)
                    sockets.add(connection.sock.getsockname())
        finally:
            connection.close()
    assert statuses == [200, 200, 403, 403, 200, 200]
    assert len(sockets) == 1, "one connection throughout"


def test_the_generation_gauge_waits_for_every_worker(world: World, proxy: StartProxy) -> None:
    """With --workers the parent compiles a reload first and shows it in /config; a worker
    runs the older policy until it has compiled the new one too. The gauge showed the
    parent's generation at once (seconds early, for a large policy): it is now the lowest
    any worker has in force. A stopped worker stands for one still compiling."""

    def generation() -> float:
        return metric(metrics_text(running), "egress_policy_generation")

    with replaced_policy("generation-workers") as (policy, write):
        write(RELOADED.format(action="deny"), 1)
        running = proxy(None, "--policy", str(policy), "--workers", "2")
        workers = Path(f"/proc/{running.pid}/task/{running.pid}/children").read_text().split()
        assert len(workers) == 2
        try:
            assert wait_until(lambda: generation() == 1, 5.0)
            os.kill(int(workers[1]), signal.SIGSTOP)
            write(RELOADED.format(action="allow"), 2)
            assert wait_until(partial(loaded, running, 2), 5.0)
            time.sleep(POLL_WINDOW)  # the running worker has adopted it by now
            assert generation() == 1, "a worker still runs generation 1"
        finally:
            os.kill(int(workers[1]), signal.SIGCONT)
        assert wait_until(lambda: generation() == 2, 5.0)


def loaded(running: Proxy, generation: int) -> bool:
    status, body = running.admin_get("/config")
    assert status == 200
    return int(json.loads(body)["generation"]) == generation


POLL_WINDOW = 1.5
"""Longer than the proxy's poll of the policy file (1 s): a process that read the file
itself would have seen a change by then."""


def test_workers_run_the_policies_their_supervisor_reloads(world: World, proxy: StartProxy) -> None:
    """With --workers only the supervisor reads the policy file: its workers run each
    policy it reloads, under its generation, so a change or a bad file is logged once,
    and a SIGHUP sent to a worker reloads nothing."""

    def probes_allowed() -> bool:
        httpbin = world.host("httpbin.org").v4
        return all(
            http_get(world, httpbin, 80, "/probe", "httpbin.org")[0] == 200 for _ in range(10)
        )

    with replaced_policy("reload-workers") as (policy, write):
        write(RELOADED.format(action="deny"), 1)
        running = proxy(None, "--policy", str(policy), "--workers", "2")
        write(RELOADED.format(action="allow"), 2)
        assert wait_until(partial(loaded, running, 2), 5.0)
        assert wait_until(probes_allowed, 2.0, interval=0.1)
        write("kind: [\n", 3)
        assert wait_until(
            lambda: (
                metric(metrics_text(running), "egress_policy_reloads_total", result="error") == 1
            ),
            5.0,
        )
        workers = Path(f"/proc/{running.pid}/task/{running.pid}/children").read_text().split()
        assert len(workers) == 2
        os.kill(int(workers[0]), signal.SIGHUP)
        assert running.logged("SIGHUP ignored by a worker"), running.log_text()
        time.sleep(POLL_WINDOW)
        log_text = running.log_text()
        assert log_text.count("policy reloaded, generation") == 1, log_text
        assert log_text.count(f"{policy}:2: YAML syntax") == 1, log_text
        assert probes_allowed()
