"""The data plane through a real redirect: real clients in the client namespace, real servers
in the fake internet, `egressproxy run` in between under its own uid (issue 2).

Every test is bounded in time. The servers' JSON echo says which address and
port a request reached; `client.port` differing from the client's own local
port shows the request was relayed, not delivered directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import ssl
import struct
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from egressproxy.netfilter import PROXY_SOURCE_PORTS

from . import servers
from .clients import (
    TlsClient,
    bytes_before_close,
    client_hello,
    closed_by_peer,
    echo_once,
    echo_transfer,
    hash_until_eof,
    http_request,
    recv_exactly,
    recv_line,
    recv_until_eof,
    send_one_byte_segments,
    send_stream,
    split_records,
    stream_sha256,
)
from .netns import http_get_in, sockets_in
from .proxy_process import StartProxy
from .test_http import HTTPBIN_DENIED
from .world import BLACKHOLE_V4, CLIENT_V4, CLIENT_V6, PROXY_PORT, World

pytestmark = pytest.mark.e2e


BIG = 256 << 20
MEDIUM = 8 << 20
CURL_TIMEOUT = 10.0


def curl_json(world: World, *args: str) -> tuple[dict[str, Any], int]:
    """curl's JSON body and the local port curl used."""
    result = world.curl("--http1.1", "-w", "\n%{local_port}", *args, timeout=CURL_TIMEOUT)
    assert result.returncode == 0, result
    body, _, local_port = result.stdout.decode().rpartition("\n")
    return json.loads(body), int(local_port)


def assert_relayed_to(
    document: dict[str, Any], host: str, address: str, port: int, client_port: int
) -> None:
    assert document["server"] == {"name": host, "address": address, "port": port}
    assert document["host"] == host
    assert document["client"]["port"] != client_port, "reached the server without the proxy"
    assert document["client"]["port"] in PROXY_SOURCE_PORTS, "left from a workload's port"


# --- passthrough of each protocol ---------------------------------------------


def test_curl_http_v4(world: World, proxy: StartProxy) -> None:
    proxy()
    document, local_port = curl_json(world, "-4", "http://httpbin.org/get")
    assert document["method"] == "GET"
    assert document["path"] == "/get"
    assert document["tls"] is None
    assert_relayed_to(document, "httpbin.org", "203.0.113.10", 80, local_port)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_curl_https_tls_versions(world: World, proxy: StartProxy, version: str) -> None:
    proxy()
    document, local_port = curl_json(
        world, "-4", f"--tlsv{version}", "--tls-max", version, "https://httpbin.org/get"
    )
    expected_tls = {"version": f"TLSv{version}", "sni": "httpbin.org", "alpn": "http/1.1"}
    assert document["tls"] == expected_tls
    assert_relayed_to(document, "httpbin.org", "203.0.113.10", 443, local_port)


@pytest.mark.parametrize("scheme, port", [("http", 80), ("https", 443)])
def test_curl_ipv6(world: World, proxy: StartProxy, scheme: str, port: int) -> None:
    proxy()
    document, local_port = curl_json(world, "-6", f"{scheme}://github.com/v6")
    assert document["path"] == "/v6"
    assert_relayed_to(document, "github.com", "2001:db8:113::20", port, local_port)


def test_openssl_s_client(world: World, proxy: StartProxy) -> None:
    proxy()
    request = b"GET /openssl HTTP/1.1\r\nHost: github.com\r\nConnection: close\r\n\r\n"
    result = world.run(
        [
            "openssl", "s_client", "-4", "-connect", "github.com:443", "-servername", "github.com",
            "-CAfile", str(world.ca_cert), "-verify_return_error", "-quiet",
        ],
        timeout=CURL_TIMEOUT,
        input=request,
    )  # fmt: skip
    assert result.returncode == 0, result
    _, _, body = result.stdout.partition(b"\r\n\r\n")
    document = json.loads(body)
    assert document["path"] == "/openssl"
    assert document["tls"]["sni"] == "github.com"
    assert document["server"] == {"name": "github.com", "address": "203.0.113.20", "port": 443}


def test_banner_on_an_opaque_port_arrives_without_waiting(world: World, proxy: StartProxy) -> None:
    """Port 25 is in the default --opaque-ports: no sniff, so no wait for the client."""
    proxy(None, "--sniff-timeout", "5")
    with world.connect(world.host("google.com").v4, 25) as sock:
        assert recv_line(sock, timeout=2.0) == b"220 google.com ESMTP ready\r\n"
        assert echo_once(sock, b"EHLO client.test\r\n") == b"EHLO client.test\r\n"


OSM_SERVER_FIRST = """\
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {name: osm-mesh-config, namespace: osm-system}
spec: {traffic: {enableEgress: false}}
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: {name: smtp, namespace: curl}
spec:
  sources: [{kind: ServiceAccount, name: curl, namespace: curl}]
  ipAddresses: [203.0.113.0/24]
  ports: [{number: 2525, protocol: tcp-server-first}]
"""


def test_an_osm_tcp_server_first_port_is_not_sniffed(world: World, proxy: StartProxy) -> None:
    """OSM turns its inspectors off on a tcp-server-first port: no wait for the client,
    as on a port in --opaque-ports (the banner waited for the sniff timeout)."""
    running = proxy(OSM_SERVER_FIRST, "--sniff-timeout", "5")
    with world.connect(world.host("example.test").v4, 2525) as sock:
        assert recv_line(sock, timeout=2.0) == b"220 example.test ESMTP ready\r\n"
        assert echo_once(sock, b"QUIT\r\n") == b"QUIT\r\n"
    assert running.logged(r"route=Egress/curl/smtp decision=allow"), running.log_text()


OSM_EXCLUSIONS = """\
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {name: osm-mesh-config, namespace: osm-system}
spec:
  traffic:
    enableEgress: false
    outboundIPRangeExclusionList: [203.0.113.10/32]
    outboundPortExclusionList: [25]
"""


def test_osms_outbound_exclusions_pass_untouched(world: World, proxy: StartProxy) -> None:
    """With egress off, what the MeshConfig's exclusion lists name passes (OSM's redirect
    never takes it to the proxy); the rest is denied."""
    proxy(OSM_EXCLUSIONS)
    document, local_port = curl_json(world, "-4", "https://httpbin.org/excluded")
    assert_relayed_to(document, "httpbin.org", "203.0.113.10", 443, local_port)
    denied = world.curl("-4", "https://github.com/", timeout=CURL_TIMEOUT)
    assert denied.returncode != 0, denied
    with world.connect(world.host("google.com").v4, 25) as sock:
        assert recv_line(sock, timeout=2.0) == b"220 google.com ESMTP ready\r\n"


TLS_ROUTE_FOR_EVERY_NAME = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {name: all-egress-traffic, namespace: egress-test}
spec: {trafficPolicy: Deny}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: tls-egress, namespace: egress-test}
spec:
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 443}
  rules:
  - backendRefs:
    - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io}
"""


def test_tls_without_a_server_name_is_refused_on_a_port_of_tls_routes(
    world: World, proxy: StartProxy
) -> None:
    """The guide's TLSRoute for every hostname: Linkerd's TLS stack requires a server
    name, so a hello without one is closed; it was spliced through."""
    running = proxy(TLS_ROUTE_FOR_EVERY_NAME, "--namespace", "egress-test")
    address = world.host("httpbin.org").v4
    with (
        world.connect(address, 443) as sock,
        world.tls_context().wrap_socket(sock, server_hostname="httpbin.org") as named,
    ):
        assert named.version() is not None
    nameless = ssl.create_default_context(cafile=str(world.ca_cert))
    nameless.check_hostname = False
    with world.connect(address, 443) as sock, pytest.raises(OSError):
        nameless.wrap_socket(sock, server_hostname=None).close()
    assert running.logged(
        r"access .* hostname=- ech=false route=default/tls-egress-deny decision=deny status=-"
        r" error=forbidden bytes_sent=0 "
    ), running.log_text()


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_banner_after_the_sniff_timeout(world: World, proxy: StartProxy, family: str) -> None:
    """The client waits for the server: the sniff times out, the connection goes opaque."""
    proxy(None, "--sniff-timeout", "0.3")
    with world.connect(world.host("example.test").address(family), 2525) as sock:
        started = time.monotonic()
        assert recv_line(sock, timeout=3.0) == b"220 example.test ESMTP ready\r\n"
        assert time.monotonic() - started >= 0.25, "the banner came before the sniff timeout"
        assert echo_once(sock, b"QUIT\r\n") == b"QUIT\r\n"


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_echo_from_python_sockets(world: World, proxy: StartProxy, family: str) -> None:
    proxy()
    with world.connect(world.host("httpbin.org").address(family), servers.ECHO_PORT) as sock:
        for round_trip in range(3):
            message = f"ping {round_trip}\r\n".encode()
            assert echo_once(sock, message) == message


URGENT_QUIET = 0.5
URGENT_CPU = 0.2
"""Seconds of CPU the proxy may use over URGENT_QUIET with nothing to do: a relay stuck at
TCP's urgent mark used all of it."""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_tcp_urgent_data_is_relayed_in_its_place(world: World, proxy: StartProxy) -> None:
    """A spliced connection (opaque TCP) carrying an urgent byte, as telnet's or a database
    client's cancel: the byte goes on in its place, the proxy idles meanwhile, and the
    client's FIN after it cuts nothing off (splice stopped at the mark: 100% CPU, and the
    FIN taken for the end with the bytes behind the mark lost)."""
    running = proxy()
    with world.connect(world.host("httpbin.org").v4, servers.ECHO_PORT) as sock:
        assert echo_once(sock, b"\x00abc") == b"\x00abc"  # no protocol's: opaque at once
        sock.send(b"D", socket.MSG_OOB)
        sock.sendall(b"efg")
        started = cpu_seconds(running.pid)
        time.sleep(URGENT_QUIET)
        spent = cpu_seconds(running.pid) - started
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"Defg"
    assert spent < URGENT_CPU


def test_ipv4_and_ipv6_through_one_proxy(world: World, proxy: StartProxy) -> None:
    running = proxy()
    host = world.host("example.test")
    for flag, address in (("-4", host.v4), ("-6", host.v6)):
        document, local_port = curl_json(world, flag, "http://example.test/both")
        assert_relayed_to(document, "example.test", str(address), 80, local_port)
    for address in host.addresses:
        with world.connect(address, servers.ECHO_PORT) as sock:
            assert echo_once(sock, b"hello\n") == b"hello\n"
    assert running.returncode is None


# --- bulk transfers ------------------------------------------------------------


def test_256_mib_through_echo_both_ways(world: World, proxy: StartProxy) -> None:
    proxy()
    with world.connect(world.host("httpbin.org").v4, servers.ECHO_PORT) as sock:
        digest, length = echo_transfer(sock, BIG, timeout=30.0)
    assert length == BIG
    assert digest == stream_sha256(BIG)


def test_256_mib_download(world: World, proxy: StartProxy) -> None:
    proxy()
    with world.connect(world.host("github.com").address("v6"), servers.SOURCE_PORT) as sock:
        sock.sendall(b"%d\n" % BIG)
        digest, length = hash_until_eof(sock, timeout=30.0)
    assert length == BIG
    assert digest == stream_sha256(BIG)


# --- half-close ---------------------------------------------------------------


def test_client_half_close_still_receives_the_answer(world: World, proxy: StartProxy) -> None:
    """Client shuts down its write side; the server's answer still comes back."""
    proxy()
    with world.connect(world.host("httpbin.org").v4, servers.HASH_PORT) as sock:
        send_stream(sock, MEDIUM, then_shutdown=True)
        answer = recv_line(sock, timeout=10.0)
        assert answer == stream_sha256(MEDIUM).encode() + b"\n"
        assert closed_by_peer(sock, timeout=5.0)


def test_server_half_close_still_takes_the_clients_bytes(world: World, proxy: StartProxy) -> None:
    """Server shuts down its write side first; the client sees EOF and can still send."""
    proxy()
    host = world.host("httpbin.org")
    token = uuid.uuid4().hex
    with world.connect(host.v4, servers.SINK_PORT) as sock:
        sock.sendall(token.encode() + b"\n")
        assert recv_line(sock) == b"ready\n"
        assert closed_by_peer(sock, timeout=5.0), "the server's EOF did not come through"
        send_stream(sock, MEDIUM, then_shutdown=True)
        deadline = time.monotonic() + 10.0
        status, body = http_get_in(world.client_ns, host.v4, 80, f"/sunk/{token}")
        while status == 404 and time.monotonic() < deadline:
            time.sleep(0.05)
            status, body = http_get_in(world.client_ns, host.v4, 80, f"/sunk/{token}")
    assert status == 200, body
    assert json.loads(body) == {"sha256": stream_sha256(MEDIUM), "length": MEDIUM}


# --- sniffing edge cases --------------------------------------------------------


@pytest.mark.parametrize(
    "send_hello",
    [
        pytest.param(send_one_byte_segments, id="one-byte-segments"),
        pytest.param(
            lambda sock, hello: sock.sendall(split_records(hello, 64)), id="64-byte-records"
        ),
    ],
)
def test_split_client_hello_then_https(
    world: World, proxy: StartProxy, send_hello: Callable[[socket.socket, bytes], None]
) -> None:
    proxy()
    host = world.host("httpbin.org")
    with world.connect(host.v4, 443, timeout=10.0) as sock:
        client = TlsClient(sock, world.tls_context(), "httpbin.org")
        client.handshake(send_hello, timeout=10.0)
        client.send(http_request("httpbin.org", "/split"))
        status, _, body = client.recv_http_response()
    assert status == 200
    document = json.loads(body)
    assert document["path"] == "/split"
    assert document["tls"]["sni"] == "httpbin.org"
    assert document["server"]["address"] == host.v4


def test_an_empty_record_before_the_hello_hides_no_name(world: World, proxy: StartProxy) -> None:
    """OpenSSL skips an empty handshake record and reads the hello behind it (the origin's
    handshake completes); the proxy reads the name behind it too. It took the connection
    for TLS without a name, which passed a rule denying that name."""
    running = proxy()
    host = world.host("httpbin.org")
    with world.connect(host.v4, 443, timeout=10.0) as sock:
        client = TlsClient(sock, world.tls_context(), "httpbin.org")
        client.handshake(lambda sock, hello: sock.sendall(b"\x16\x03\x01\x00\x00" + hello))
        client.send(http_request("httpbin.org", "/empty-record"))
        status, _, body = client.recv_http_response()
    assert status == 200 and json.loads(body)["tls"]["sni"] == "httpbin.org"
    assert running.logged(r"protocol=tls hostname=httpbin\.org"), running.log_text()


def test_silent_client_of_a_client_first_service(world: World, proxy: StartProxy) -> None:
    """Nothing within --sniff-timeout: opaque; the client speaking later still gets through."""
    proxy(None, "--sniff-timeout", "0.3")
    with world.connect(world.host("github.com").v4, servers.ECHO_PORT) as sock:
        time.sleep(0.6)
        assert echo_once(sock, b"late hello\n") == b"late hello\n"
        assert echo_once(sock, b"\x16\x03\x01 not tls\n") == b"\x16\x03\x01 not tls\n"


def assert_served(world: World) -> None:
    """The connection after a bad one is relayed correctly (HTTP, HTTPS and opaque)."""
    document, local_port = curl_json(world, "-4", "http://httpbin.org/next")
    assert_relayed_to(document, "httpbin.org", "203.0.113.10", 80, local_port)
    document, local_port = curl_json(world, "-4", "https://github.com/next")
    assert_relayed_to(document, "github.com", "203.0.113.20", 443, local_port)
    with world.connect(world.host("google.com").v4, servers.ECHO_PORT) as sock:
        assert echo_once(sock, b"next\n") == b"next\n"


def garbage(size: int) -> bytes:
    """Random bytes that do not begin like a TLS record or an HTTP method."""
    return b"\xff" + random.Random(2).randbytes(size - 1)


@pytest.mark.parametrize(
    "unreadable",
    [
        pytest.param(lambda hello: split_records(hello, 1), id="one-byte-records"),
        pytest.param(lambda hello: hello.replace(b"httpbin.org", b"httpbin:443"), id="sni-port"),
    ],
)
def test_a_hello_the_sniffer_cannot_read_is_denied(
    world: World, proxy: StartProxy, unreadable: Callable[[bytes], bytes]
) -> None:
    """One-byte records hide the SNI past the records the sniffer walks, and the origin's
    TLS server takes them (the 64-byte records above complete a handshake); an SNI with a
    port is no host name, yet nginx picks its server by the name before the colon. Each
    is denied, even under the allow-all policy, before anything reaches the origin."""
    running = proxy()
    hello = client_hello(world.tls_context(), "httpbin.org")
    with world.connect(world.host("httpbin.org").v4, 443) as sock:
        sock.sendall(unreadable(hello))
        sock.shutdown(socket.SHUT_WR)
        assert bytes_before_close(sock) == b""
    assert running.logged(r"error=forbidden"), running.log_text()


def in_record_version(version: bytes) -> Callable[[bytes], bytes]:
    return lambda hello: hello[:1] + version + hello[3:]


@pytest.mark.parametrize(
    "disguise",
    [
        pytest.param(lambda hello: b"\x15\x03\x01\x00\x02\x01\x5a" + hello, id="alert-first"),
        pytest.param(in_record_version(b"\x04\x01"), id="record-version-4.1"),
        pytest.param(in_record_version(b"\x00\x02"), id="record-version-0.2"),
        pytest.param(
            lambda hello: hello[:3] + struct.pack("!H", 17000) + hello[5:] + bytes(17000),
            id="record-over-16KiB",
        ),
    ],
)
def test_a_hello_disguised_for_go_or_java_servers_meets_the_host_rules(
    world: World, proxy: StartProxy, disguise: Callable[[bytes], bytes]
) -> None:
    """Go's and Java's TLS servers read a hello behind a warning alert, in a record of
    version 4.1 or 0.2, or in one of up to 2^14 + 2048 bytes (OpenSSL refuses all three).
    Each went through as opaque TCP or as TLS without a name, past a rule denying the
    name, which is now read and denied."""
    running = proxy(HTTPBIN_DENIED)
    hello = client_hello(world.tls_context(), "httpbin.org")
    with world.connect(world.host("httpbin.org").v4, 443) as sock:
        sock.sendall(disguise(hello))
        sock.shutdown(socket.SHUT_WR)
        assert bytes_before_close(sock) == b""
    assert running.logged(r"protocol=tls hostname=httpbin\.org .*error=forbidden"), (
        running.log_text()
    )


def test_garbage_is_relayed_and_the_proxy_stays_up(world: World, proxy: StartProxy) -> None:
    running = proxy()
    host = world.host("httpbin.org")
    junk = garbage(4096)
    with world.connect(host.v4, servers.ECHO_PORT) as sock:
        assert echo_once(sock, junk) == junk
    for port in (80, 443):
        with world.connect(host.v4, port) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            assert closed_by_peer(sock, timeout=5.0)
    assert running.returncode is None
    assert_served(world)


def test_truncated_hellos_leave_the_proxy_serving(world: World, proxy: StartProxy) -> None:
    running = proxy()
    host = world.host("httpbin.org")
    truncated = client_hello(world.tls_context(), "httpbin.org")[:50]
    with world.connect(host.v4, 443) as closing:
        closing.sendall(truncated)
    with world.connect(host.v4, 443) as stalled:
        stalled.sendall(truncated)
        assert running.returncode is None
        assert_served(world)
        with world.connect(host.address("v6"), 443) as stalled_v6:
            stalled_v6.sendall(truncated)
            assert_served(world)
    assert running.returncode is None
    assert_served(world)


# --- load, drain, loops --------------------------------------------------------


CONCURRENT = 2000


def test_2000_concurrent_connections(world: World, proxy: StartProxy) -> None:
    proxy()
    host = world.host("httpbin.org")
    targets = [(host.address("v4"), socket.AF_INET), (host.address("v6"), socket.AF_INET6)]

    async def run() -> list[bytes]:
        loop = asyncio.get_running_loop()
        per_family = CONCURRENT // len(targets)
        connections = []
        for address, family in targets:
            for sock in sockets_in(world.client_ns, family, per_family):
                sock.setblocking(False)
                connections.append((sock, address))
        try:
            await asyncio.gather(
                *(loop.sock_connect(sock, (addr, servers.ECHO_PORT)) for sock, addr in connections)
            )

            async def round_trip(index: int, sock: socket.socket) -> bytes:
                message = b"connection %05d\n" % index
                await loop.sock_sendall(sock, message)
                received = b""
                while len(received) < len(message):
                    chunk = await loop.sock_recv(sock, len(message) - len(received))
                    if not chunk:
                        break
                    received += chunk
                return received

            return await asyncio.gather(
                *(round_trip(index, sock) for index, (sock, _) in enumerate(connections))
            )
        finally:
            for sock, _ in connections:
                sock.close()

    async def bounded() -> list[bytes]:
        return await asyncio.wait_for(run(), timeout=60.0)

    replies = asyncio.run(bounded())
    assert replies == [b"connection %05d\n" % index for index in range(CONCURRENT)]


def test_sigterm_drains_a_transfer_and_exits_0(world: World, proxy: StartProxy) -> None:
    """SIGTERM mid-transfer: no new connections, /ready says 503, the open transfer completes
    intact, then the proxy exits 0."""
    running = proxy()
    host = world.host("httpbin.org")
    with world.connect(host.v4, servers.SOURCE_PORT, timeout=30.0) as sock:
        sock.sendall(b"%d\n" % BIG)
        head = recv_exactly(sock, 16 << 20, timeout=10.0)
        running.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert running.returncode is None, "the proxy quit before its open connection finished"
        assert running.admin_get("/ready")[0] == 503
        with pytest.raises(ConnectionRefusedError):
            world.connect(host.v4, servers.ECHO_PORT, timeout=2.0).close()
        digest, length = hash_until_eof(sock, timeout=30.0, prefix=head)
    assert length == BIG
    assert digest == stream_sha256(BIG)
    assert running.wait(10.0) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_sigterm_ends_the_drain_at_once(
    world: World, proxy: StartProxy, workers: int
) -> None:
    """An idle connection holds the drain (30 s by default); a second SIGTERM, sent to the
    supervisor of --workers 2 too, cuts it and the proxy exits 0 without waiting it out."""
    running = proxy(None, "--workers", str(workers))
    with world.connect(world.host("httpbin.org").v4, servers.ECHO_PORT) as sock:
        assert echo_once(sock, b"\x00before") == b"\x00before"
        running.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert running.returncode is None and running.admin_get("/ready")[0] == 503
        assert echo_once(sock, b"draining") == b"draining"
        running.send_signal(signal.SIGTERM)
        assert running.wait(10.0) == 0
        assert bytes_before_close(sock, timeout=5.0) == b""


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_sent_to_every_process_of_the_workers_drains_once(
    world: World, proxy: StartProxy, stop: signal.Signals
) -> None:
    """systemd (KillMode=control-group) and Ctrl-C signal every process of --workers at
    once, and the supervisor forwards its own: a worker took the two for an operator's
    second stop and cut its connections at once. A second stop to all still hurries."""
    running = proxy(None, "--workers", "2")
    echo = world.host("httpbin.org").v4
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(world.connect(echo, servers.ECHO_PORT)) for _ in range(6)]
        for index, sock in enumerate(socks):
            assert echo_once(sock, b"\x00before %d" % index) == b"\x00before %d" % index
        running.send_signal(stop, group=True)
        time.sleep(0.5)
        assert running.returncode is None and running.admin_get("/ready")[0] == 503
        for index, sock in enumerate(socks):
            assert echo_once(sock, b"draining %d" % index) == b"draining %d" % index, index
        running.send_signal(stop, group=True)
        assert running.wait(10.0) == 0
        for sock in socks:
            assert bytes_before_close(sock, timeout=5.0) == b""


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_direct_connection_to_the_listener_is_closed(
    world: World, proxy: StartProxy, address: str
) -> None:
    """Loopback is not redirected, so SO_ORIGINAL_DST is the listener itself: closed at once."""
    running = proxy()
    with world.connect(address, PROXY_PORT) as sock:
        sock.sendall(http_request("httpbin.org", "/loop"))
        assert bytes_before_close(sock, timeout=5.0) == b""
    assert running.returncode is None
    assert_served(world)


@pytest.mark.parametrize("address", [CLIENT_V4, CLIENT_V6])
def test_redirected_connection_to_the_proxys_own_address_is_closed(
    world: World, proxy: StartProxy, address: str
) -> None:
    """ADDRESS:15001 is redirected, and with the listener on the wildcard address it is the
    listener too: the connection is closed, never proxied to itself (so no 502 either)."""
    running = proxy()
    with world.connect(address, PROXY_PORT) as sock:
        sock.sendall(http_request("httpbin.org", "/loop"))
        assert bytes_before_close(sock, timeout=5.0) == b""
    assert running.returncode is None
    assert_served(world)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_a_remote_port_like_the_listeners_is_no_loop_where_nonlocal_bind_is_set(
    world: World, proxy: StartProxy, family: str
) -> None:
    """With ip_nonlocal_bind any address can be bound, so binding cannot tell the proxy's
    own addresses from a remote one: a connection to another host's port 15001 goes there."""
    sysctl = f"net.ip{family}.ip_nonlocal_bind"
    target = world.host("httpbin.org").address(family)
    world.run(["sysctl", "-qw", f"{sysctl}=1"]).check_returncode()
    try:
        running = proxy()
        with world.connect(target, PROXY_PORT) as sock:  # nothing listens there
            sock.sendall(b"hello\n")
            assert closed_by_peer(sock, timeout=5.0)
        assert running.logged(r"error=connect_refused"), running.log_text()
        assert "connected to the proxy itself" not in running.log_text()
    finally:
        world.run(["sysctl", "-qw", f"{sysctl}=0"]).check_returncode()


# --- upstream failures, timeouts, backpressure --------------------------------


def test_refused_upstream_closes_the_client(world: World, proxy: StartProxy) -> None:
    proxy()
    with world.connect(world.host("httpbin.org").v4, 81) as sock:
        sock.sendall(b"hello\n")
        assert closed_by_peer(sock, timeout=5.0)


def test_upstream_connect_timeout_closes_the_client(world: World, proxy: StartProxy) -> None:
    proxy(None, "--connect-timeout", "0.5")
    with world.connect(BLACKHOLE_V4, servers.ECHO_PORT) as sock:
        started = time.monotonic()
        sock.sendall(b"hello\n")
        assert closed_by_peer(sock, timeout=5.0)
        assert time.monotonic() - started >= 0.4


def test_idle_connection_is_closed(world: World, proxy: StartProxy) -> None:
    proxy(None, "--idle-timeout", "0.5")
    with world.connect(world.host("httpbin.org").v4, servers.ECHO_PORT) as sock:
        for _ in range(3):
            assert echo_once(sock, b"busy\n") == b"busy\n"
            time.sleep(0.2)
        assert closed_by_peer(sock, timeout=5.0)


def test_slow_reader_keeps_proxy_memory_bounded(world: World, proxy: StartProxy) -> None:
    """The source can send 256 MiB at once; a client that reads nothing must not make the proxy
    hold it: reading from the server pauses when the client side backs up."""
    running = proxy()
    with world.connect(world.host("httpbin.org").v4, servers.SOURCE_PORT) as warm_up:
        warm_up.sendall(b"%d\n" % MEDIUM)
        hash_until_eof(warm_up, timeout=10.0)
    baseline = running.rss_bytes()
    with world.connect(world.host("httpbin.org").v4, servers.SOURCE_PORT) as sock:
        sock.sendall(b"%d\n" % BIG)
        time.sleep(1.0)
        growth = running.rss_bytes() - baseline
        recv_exactly(sock, 1 << 20)
    assert growth < 32 << 20, f"the proxy grew {growth >> 20} MiB for a reader that reads nothing"
    assert running.returncode is None
    assert_served(world)
