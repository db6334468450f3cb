"""Listener shapes through the real redirect: one dual-stack socket (IPv4 clients arrive as
v4-mapped addresses and their original destination is still found) and several workers."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from egressproxy.netfilter import PROXY_SOURCE_PORTS

from . import servers
from .clients import echo_once
from .proxy_process import Proxy
from .world import World

pytestmark = pytest.mark.e2e

StartProxy = Callable[..., Proxy]


def served_by(world: World, family: str, url: str) -> str:
    """The address of the fake host that answered the request."""
    result = world.curl(family, url)
    assert result.returncode == 0, result.stderr
    server = json.loads(result.stdout)["server"]
    assert isinstance(server, dict)
    return str(server["address"])


def test_a_dual_stack_listener_serves_ipv4_clients_as_v4_mapped(
    world: World, proxy: StartProxy
) -> None:
    """The socket sees `::ffff:198.18.0.2`; the access line says the IPv4 address, as it
    says the destination, so one client has one spelling whichever listener took it."""
    running = proxy(None, "--listen", "[::]:15001")
    httpbin = world.host("httpbin.org")
    assert served_by(world, "-4", "http://httpbin.org/get") == httpbin.v4
    assert served_by(world, "-6", "http://httpbin.org/get") == httpbin.v6
    assert running.logged(r"client=198\.18\.0\.2:\d+ "), running.log_text()
    assert running.logged(r"client=\[2001:db8:0:1::2\]:\d+ "), running.log_text()


def test_workers_share_the_listeners(world: World, proxy: StartProxy) -> None:
    running = proxy(None, "--workers", "2")
    github = world.host("github.com")
    for _ in range(20):
        assert served_by(world, "-4", "http://github.com/") == github.v4
    status, body = running.admin_get("/metrics")
    assert status == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert samples[("egress_sniff_outcomes_total", (("outcome", "http1"),))] == 20
    assert samples[("egress_open_connections", ())] == 0


def test_workers_starting_reset_no_connection(world: World, proxy: StartProxy) -> None:
    """Clients connecting while --workers start: the supervisor's listener, bound first,
    queued some of their connections and reset them when it closed once the workers
    listened. Every connection the listeners took must be served."""
    address = world.host("github.com").v4
    deadline = time.monotonic() + 20.0
    stop = threading.Event()
    served: list[int] = []
    failures: list[str] = []

    def client(number: int) -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                sock = world.connect(address, servers.ECHO_PORT, timeout=2.0)
            except ConnectionRefusedError:  # nothing listens yet
                time.sleep(0.005)
                continue
            except OSError as error:
                failures.append(f"connect: {error!r}")
                return
            with sock:
                line = b"client %d\n" % number
                try:
                    answer = echo_once(sock, line, timeout=5.0)
                except OSError as error:
                    failures.append(f"echo: {error!r}")
                    return
            if answer != line:
                failures.append(f"echo answered {answer!r}")
                return
            served.append(number)

    clients = [threading.Thread(target=client, args=(number,)) for number in range(24)]
    for thread in clients:
        thread.start()
    try:
        proxy(None, "--workers", "4")
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30.0)
    assert not any(thread.is_alive() for thread in clients)
    assert not failures, failures
    assert served


def test_workers_hold_the_hostname_cap_together(world: World, proxy: StartProxy) -> None:
    """--max-hostnames caps the hostnames a scrape shows, and a scrape sums the workers:
    with each worker keeping its own first names, it showed one per worker."""
    running = proxy(None, "--workers", "2", "--max-hostnames", "1")
    address = world.host("github.com").v4
    requests = 24
    with contextlib.ExitStack() as held:
        for number in range(requests):
            sock = held.enter_context(world.connect(address, 80))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: h%d.example\r\n\r\n" % number)
            response = http.client.HTTPResponse(sock, method="GET")
            response.begin()
            response.read()
            assert response.status == 200
        listing = world.run(["ss", "-Htnp", "state", "established", "dst", f"{address}:80"])
    assert listing.returncode == 0, listing.stderr
    serving = {
        owner.group(1)
        for line in listing.stdout.decode().splitlines()
        if (owner := re.search(r"pid=(\d+)", line))
        and int(line.split()[2].rpartition(":")[2]) in PROXY_SOURCE_PORTS
    }
    assert len(serving) == 2, f"both workers served requests: {listing.stdout.decode()}"
    status, body = running.admin_get("/metrics")
    assert status == 200
    by_hostname: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "outbound_http_route_request_statuses_total":
                hostname = sample.labels["hostname"]
                by_hostname[hostname] = by_hostname.get(hostname, 0) + sample.value
    assert by_hostname == {"h0.example": 1, "other": requests - 1}


def test_each_worker_draws_its_own_share_of_source_ports(world: World, proxy: StartProxy) -> None:
    """Worker i of N connects from every N-th port of PROXY_SOURCE_PORTS only, so two
    workers connecting to one destination never walk into each other's ports."""
    proxy(None, "--workers", "2")
    address = world.host("github.com").v4
    with contextlib.ExitStack() as held:
        for number in range(24):
            sock = held.enter_context(world.connect(address, servers.ECHO_PORT))
            line = b"connection %d\n" % number
            assert echo_once(sock, line) == line
        listing = world.run(
            ["ss", "-Htnp", "state", "established", "dst", f"{address}:{servers.ECHO_PORT}"]
        )
    assert listing.returncode == 0, listing.stderr
    shares: dict[int, set[int]] = {}
    for line in listing.stdout.decode().splitlines():
        local, owner = line.split()[2], re.search(r"pid=(\d+)", line)
        port = int(local.rpartition(":")[2])
        if owner is not None and port in PROXY_SOURCE_PORTS:
            share = (port - PROXY_SOURCE_PORTS.start) % 2
            shares.setdefault(int(owner.group(1)), set()).add(share)
    assert len(shares) == 2, listing.stdout.decode()
    assert sorted(share for worker in shares.values() for share in worker) == [0, 1], shares
