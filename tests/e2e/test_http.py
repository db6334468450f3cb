"""HTTP request by request through the real redirect: HTTP/1.x, h2c and gRPC, with real clients."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from egressproxy.flow import HEADER_TIMEOUT
from egressproxy.netfilter import PROXY_SOURCE_PORTS

from . import servers
from .clients import echo_once, recv_exactly, recv_until_eof, stream_sha256
from .netns import NamespaceHTTPConnection, call_in
from .proxy_process import StartProxy, metric
from .world import BLACKHOLE_V4, STOP_TIMEOUT, World, stop_process

pytestmark = pytest.mark.e2e

H1_PORT, H2_PORT, GRPC_PORT, GRPC_AGED_PORT = 8080, 8081, 50051, 50061
H2_URL = f"http://example.test:{H2_PORT}/get"
SERVERS_READY_TIMEOUT = 15.0
TIMEOUT = 10.0

DENY_BUT_GET = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata:
  namespace: egress-test
  name: all-egress-traffic
spec:
  trafficPolicy: Deny
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: HTTPRoute
metadata:
  name: httpbin-get
  namespace: egress-test
spec:
  parentRefs:
  - name: all-egress-traffic
    kind: EgressNetwork
    group: policy.linkerd.io
    namespace: egress-test
    port: {port}
  rules:
  - matches:
    - path:
        value: "/get"
    - path:
        type: PathPrefix
        value: "/bytes"
    - path:
        value: "/raw-head"
    - path:
        type: PathPrefix
        value: "/chat"
    - path:
        type: PathPrefix
        value: "/up"
    - method: CONNECT
"""

GRPC_POLICY = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata:
  namespace: egress-test
  name: all-egress-traffic
spec:
  trafficPolicy: Deny
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: echo-only
  namespace: egress-test
spec:
  parentRefs:
  - name: all-egress-traffic
    kind: EgressNetwork
    group: policy.linkerd.io
    namespace: egress-test
    port: {port}
  rules:
  - matches:
    - method:
        service: test.Echo
        method: Echo
"""

REDIRECT_GUIDE = Path(__file__).resolve().parents[2] / "config/examples/linkerd-5-redirect.yaml"


@pytest.fixture(scope="module")
def http_servers(world: World) -> Iterator[None]:
    """tests/e2e/http_servers.py in the internet namespace, for this module's tests."""
    log_path = world.workdir / "http_servers.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                world.internet_ns,
                sys.executable,
                str(Path(__file__).with_name("http_servers.py")),
                "--h1",
                str(H1_PORT),
                "--h2",
                str(H2_PORT),
                "--grpc",
                str(GRPC_PORT),
                "--grpc-aged",
                str(GRPC_AGED_PORT),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVERS_READY_TIMEOUT
        while b"ready" not in log_path.read_bytes() or not all(
            _accepts(world, port) for port in (GRPC_PORT, GRPC_AGED_PORT)
        ):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"http_servers.py did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield
    finally:
        stop_process(process)


def _accepts(world: World, port: int) -> bool:
    address = world.host("example.test").v4

    def probe() -> bool:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            return sock.connect_ex((address, port)) == 0

    return call_in(world.internet_ns, probe)


def policy(port: int = 80) -> str:
    return DENY_BUT_GET.format(port=port)


def run_proxy(proxy: StartProxy, text: str, *args: str) -> None:
    proxy(text, "--namespace", "egress-test", *args)


def metrics_text(world: World, proxy_port: int = 4191) -> str:
    from .netns import http_get_in

    status, body = http_get_in(world.client_ns, "127.0.0.1", proxy_port, "/metrics")
    assert status == 200
    return body.decode()


def connection(world: World, host: str, port: int = 80) -> NamespaceHTTPConnection:
    return NamespaceHTTPConnection(world.client_ns, world.host(host).v4, port, TIMEOUT)


def request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    host: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    all_headers = {"Host": host, **(headers or {})}
    chunked = all_headers.get("Transfer-Encoding") == "chunked"
    conn.request(method, path, body=body, headers=all_headers, encode_chunked=chunked)
    response = conn.getresponse()
    return response.status, response.read()


# --- HTTP/1.x -----------------------------------------------------------------


def test_curl_keep_alive_decides_every_request(world: World, proxy: StartProxy) -> None:
    run_proxy(proxy, policy())
    urls = ["/get", "/post", "/get", "/anything/get", "/get"]
    targets = [arg for url in urls for arg in ("-o", "/dev/null", f"http://httpbin.org{url}")]
    result = world.curl("--http1.1", "-w", "%{http_code} %{num_connects}\\n", *targets)
    assert result.returncode == 0, result
    lines = [line.split() for line in result.stdout.decode().splitlines()]
    assert [code for code, _ in lines] == ["200", "403", "200", "403", "200"]
    assert [connects for _, connects in lines] == ["1", "0", "0", "0", "0"], "one connection"
    text = metrics_text(world)
    assert (
        metric(
            text,
            "outbound_http_route_request_statuses_total",
            route_name="httpbin-get",
            hostname="httpbin.org",
            http_status="200",
        )
        == 3
    )
    assert (
        metric(
            text,
            "outbound_http_route_request_statuses_total",
            route_name="http-egress-deny",
            hostname="httpbin.org",
            http_status="403",
            error="",
        )
        == 2
    )


def test_python_keep_alive_and_pipelining(world: World, proxy: StartProxy) -> None:
    run_proxy(proxy, policy())
    conn = connection(world, "httpbin.org")
    try:
        for path, expected in [("/get", 200), ("/admin", 403), ("/get?x=1", 200), ("/", 403)]:
            get_answered(conn, path, expected)
        first_socket = conn.sock
        status, _ = request(conn, "GET", "/get", "httpbin.org")
        assert (status, conn.sock) == (200, first_socket)
    finally:
        conn.close()
    paths = ["/get", "/nope", "/bytes/70000", "/get", "/nope"]
    assert pipelined(world, paths) == [200, 403, 200, 200, 403, 200]


def get_answered(conn: NamespaceHTTPConnection, path: str, expected: int) -> None:
    """GET path from httpbin.org on conn gets expected: the proxy's denial text, or the
    echo of the path by httpbin.org."""
    status, body = request(conn, "GET", path, "httpbin.org")
    assert status == expected, path
    if status == 403:
        assert body == b"traffic not allowed\n"
    else:
        assert json.loads(body)["path"] == path


def pipelined(world: World, paths: list[str]) -> list[int]:
    """The statuses of GETs of paths to httpbin.org sent at once on one connection, and of
    a last GET /get that closes it."""
    sock = world.connect(world.host("httpbin.org").v4, 80)
    try:
        sock.sendall(
            b"".join(f"GET {p} HTTP/1.1\r\nHost: httpbin.org\r\n\r\n".encode() for p in paths)
            + b"GET /get HTTP/1.1\r\nHost: httpbin.org\r\nConnection: close\r\n\r\n"
        )
        return split_responses(recv_until_eof(sock, TIMEOUT))
    finally:
        sock.close()


def test_a_head_sent_again_gets_the_answer_it_got(world: World, proxy: StartProxy) -> None:
    """A connection that sends its last head again, allowed or denied, one at a time or
    pipelined, is answered and counted as the first time (the proxy reads and decides such
    a head once, and an upstream's repeated answer head too)."""
    run_proxy(proxy, policy())
    conn = connection(world, "httpbin.org")
    try:
        for path, expected in [("/get", 200)] * 3 + [("/admin", 403)] * 2 + [("/get", 200)] * 2:
            get_answered(conn, path, expected)
    finally:
        conn.close()
    paths = ["/get", "/get", "/nope", "/nope", "/get"]
    assert pipelined(world, paths) == [200, 200, 403, 403, 200, 200]
    text = metrics_text(world)
    statuses = "outbound_http_route_request_statuses_total"
    assert metric(text, statuses, route_name="httpbin-get", http_status="200") == 5 + 4
    assert metric(text, statuses, route_name="http-egress-deny", http_status="403") == 2 + 2


DEBUG_ONLY = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {namespace: egress-test, name: all-egress-traffic}
spec: {trafficPolicy: Deny}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: egress-test, name: debug-only}
spec:
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 80}
  rules:
  - matches:
    - path: {value: /get}
      queryParams: [{name: debug, value: "1"}]
    - path: {value: /get}
      headers: [{name: x-debug, value: "1"}]
"""


def test_requests_differing_only_in_a_matched_query_or_header_are_each_decided(
    world: World, proxy: StartProxy
) -> None:
    """One keep-alive connection alternates a path with and without the query parameter
    or header a route matches: each request gets its own answer, however many of the same
    path were decided before it (the index remembers request decisions only for a policy
    that reads neither)."""
    run_proxy(proxy, DEBUG_ONLY)
    conn = connection(world, "httpbin.org")
    sent = [
        ("/get?debug=1", {}, 200),
        ("/get?debug=0", {}, 403),
        ("/get", {"X-Debug": "1"}, 200),
        ("/get", {}, 403),
        ("/get", {"X-Debug": "0"}, 403),
        ("/get?debug=1", {}, 200),
        ("/get", {"X-Debug": "1"}, 200),
        ("/get", {}, 403),
    ]
    try:
        for path, headers, expected in sent:
            status, _ = request(conn, "GET", path, "httpbin.org", headers=headers)
            assert status == expected, (path, headers)
    finally:
        conn.close()
    text = metrics_text(world)
    statuses = "outbound_http_route_request_statuses_total"
    assert metric(text, statuses, route_name="debug-only", http_status="200") == 4
    assert metric(text, statuses, route_name="http-egress-deny", http_status="403") == 4


GET_ONLY = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {namespace: egress-test, name: all-egress-traffic}
spec: {trafficPolicy: Deny}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: egress-test, name: get-only}
spec:
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 80}
  rules:
  - matches: [{path: {value: /get}, method: GET}]
"""


def test_requests_differing_in_query_method_or_path_keep_or_get_their_decision(
    world: World, proxy: StartProxy
) -> None:
    """One keep-alive connection whose requests share their headers and change query, then
    method, then path: a request like the last but for its query has the last one's
    answer (this policy reads no query), another method or path is decided anew."""
    run_proxy(proxy, GET_ONLY)
    conn = connection(world, "httpbin.org")
    sent = [
        ("GET", "/get?n=1", 200),
        ("GET", "/get?n=2", 200),
        ("DELETE", "/get?n=3", 403),
        ("DELETE", "/get?n=4", 403),
        ("GET", "/get?n=5", 200),
        ("GET", "/anything?n=6", 403),
        ("GET", "/anything?n=7", 403),
    ]
    try:
        for method, path, expected in sent:
            status, _ = request(conn, method, path, "httpbin.org")
            assert status == expected, (method, path)
    finally:
        conn.close()
    text = metrics_text(world)
    statuses = "outbound_http_route_request_statuses_total"
    assert metric(text, statuses, route_name="get-only", http_status="200") == 3
    assert metric(text, statuses, route_name="http-egress-deny", http_status="403") == 4


def test_a_closing_first_request_is_answered_then_closed(world: World, proxy: StartProxy) -> None:
    """wrk's new-connection load: one request with Connection: close, allowed or denied."""
    run_proxy(proxy, policy())
    for path, expected in [("/get", 200), ("/admin", 403)]:
        sock = world.connect(world.host("httpbin.org").v4, 80)
        try:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: httpbin.org\r\nConnection: close\r\n\r\n".encode()
            )
            answer = recv_until_eof(sock, TIMEOUT)
        finally:
            sock.close()
        assert split_responses(answer) == [expected], path
        if expected == 403:
            assert answer.endswith(b"\r\nConnection: close\r\n\r\ntraffic not allowed\n")


@pytest.mark.parametrize(
    "head",
    [
        b"GET /get HTTP/01.1\r\nHost: www.example.test\r\n\r\n",
        b"GET /get HTTP/1.10\r\nHost: www.example.test\r\n\r\n",
        b"GET /get\r\n",
        b"GET /get HTTP/1.1\r\nHost: www.example.test\xa0\r\n\r\n",
        b"\r\n" * 11 + b"GET /get HTTP/1.1\r\nHost: httpbin.org\r\n\r\n",
    ],
    ids=["version-01.1", "version-1.10", "http-0.9", "host-nbsp", "eleven-empty-lines"],
)
def test_a_head_nginx_would_read_otherwise_is_refused_not_relayed(
    world: World, proxy: StartProxy, head: bytes
) -> None:
    """nginx reads a version digit by digit, serves HTTP/0.9's line, and keeps `\\xa0` in a
    host (then serving its default server): such a head is refused 400 by the proxy, never
    relayed as opaque bytes past the host rule, nor decided on a host it does not name."""
    running = proxy(NATIVE_HOST_DENY, "--namespace", "egress-test")
    sock = world.connect(world.host("httpbin.org").v4, 80)
    try:
        sock.sendall(head)
        sock.shutdown(socket.SHUT_WR)
        answer = recv_until_eof(sock, TIMEOUT)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert running.logged(r"access .* protocol=http1 .* status=400 error=bad_request ")


@pytest.mark.parametrize("line", [b"GET /get\r\n", b"GET  /get  HTTP/1.1\r\n"])
def test_a_bad_request_line_is_answered_400_while_its_client_waits(
    world: World, proxy: StartProxy, line: bytes
) -> None:
    """An HTTP/0.9 client sends its one line and waits for the answer: the rest of a head
    never comes, and the line was answered 408 only at --header-timeout (10 s)."""
    running = proxy(NATIVE_HOST_DENY, "--namespace", "egress-test")
    sock = world.connect(world.host("httpbin.org").v4, 80)
    try:
        sock.sendall(line)
        sock.settimeout(3.0)  # well before the header timeout
        answer = sock.recv(4096)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert running.logged(r"access .* protocol=http1 .* status=400 error=bad_request ")


def test_a_versionless_line_of_another_method_than_get_is_relayed_as_bytes(
    world: World, proxy: StartProxy
) -> None:
    """HTTP/0.9 has GET only, and no server serves another method without a version: such
    a first line (or a binary message shaped like one) is opaque bytes for its server, not
    a request the proxy refuses."""
    running = proxy(NATIVE_HOST_DENY, "--namespace", "egress-test")
    with world.connect(world.host("httpbin.org").v4, servers.ECHO_PORT) as sock:
        assert echo_once(sock, b"POST /x\r\n") == b"POST /x\r\n"
    assert running.logged(r"access .* protocol=opaque .* status=- error=- "), running.log_text()


def split_responses(data: bytes) -> list[int]:
    """Statuses of back-to-back responses framed by Content-Length."""
    statuses = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        statuses.append(int(head.split(b" ", 2)[1]))
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert length is not None, head
        data = data[int(length.group(1)) :]
    return statuses


def test_50_mib_upload_and_256_mib_download(world: World, proxy: StartProxy) -> None:
    run_proxy(proxy, policy())
    conn = connection(world, "httpbin.org")
    upload = 50 << 20
    block = hashlib.sha256(b"seed").digest() * 2048

    def body() -> Iterator[bytes]:
        for _ in range(upload // len(block)):
            yield block

    expected_upload = hashlib.sha256(block * (upload // len(block))).hexdigest()
    try:
        status, answer = request(
            conn, "POST", "/get", "httpbin.org", body(), {"Content-Length": str(upload)}
        )
        assert status == 200
        assert json.loads(answer)["body"] == {"length": upload, "sha256": expected_upload}
        status, answer = request(
            conn, "POST", "/get", "httpbin.org", body(), {"Transfer-Encoding": "chunked"}
        )
        assert json.loads(answer)["body"] == {"length": upload, "sha256": expected_upload}
        total = 256 << 20
        conn.request("GET", f"/bytes/{total}", headers={"Host": "httpbin.org"})
        response = conn.getresponse()
        digest = hashlib.sha256()
        received = 0
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            received += len(chunk)
        assert (received, digest.hexdigest()) == (total, stream_sha256(total))
    finally:
        conn.close()


def test_100_continue_through_curl(
    world: World, proxy: StartProxy, http_servers: None, tmp_path: Path
) -> None:
    run_proxy(proxy, policy(H1_PORT))
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * 200_000)
    payload.chmod(0o644)
    result = world.curl(
        "--http1.1",
        "-v",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{payload}",
        f"http://example.test:{H1_PORT}/up",
    )
    assert result.returncode == 0, result
    assert b"< HTTP/1.1 100" in result.stderr, result.stderr.decode()
    assert json.loads(result.stdout)["body"]["length"] == 200_000


def test_request_head_is_forwarded_byte_for_byte(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    run_proxy(proxy, policy(H1_PORT))
    head = (
        f"GET http://example.test:{H1_PORT}/raw-head HTTP/1.1\r\nX-B: 1\r\n"
        f"hOsT: example.test:{H1_PORT}\r\nX-A: two  words\r\n\r\n"
    ).encode()
    sock = world.connect(world.host("example.test").v4, H1_PORT)
    try:
        sock.sendall(head)
        answer = b""
        sock.settimeout(TIMEOUT)
        while head not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_websocket_upgrade_and_connect_are_spliced(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    run_proxy(proxy, policy(H1_PORT))
    address = world.host("example.test").v4
    sock = world.connect(address, H1_PORT)
    try:
        sock.sendall(
            b"GET /chat HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # masked "Hello" (RFC 6455)
        sock.sendall(frame)
        assert recv_exactly(sock, len(frame), TIMEOUT) == frame
    finally:
        sock.close()
    sock = world.connect(address, H1_PORT)
    try:
        sock.sendall(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n")
        assert _read_head(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"\x16\x03\x01 anything at all")
        assert recv_exactly(sock, 19, TIMEOUT) == b"\x16\x03\x01 anything at all"
    finally:
        sock.close()


def test_a_connect_with_a_body_gets_400_through_the_redirect(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    """A CONNECT has no content: a forward proxy refusing the tunnel (407) and keeping the
    connection would read the body as its next request, one the policy never decided."""
    running = proxy(policy(H1_PORT), "--namespace", "egress-test")
    smuggled = b"GET http://github.com/ HTTP/1.1\r\nHost: github.com\r\n\r\n"
    with world.connect(world.host("example.test").v4, H1_PORT) as sock:
        sock.sendall(
            b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled)
        )
        assert _read_head(sock).startswith(b"HTTP/1.1 400 ")
    assert running.logged(r"protocol=http1 .*status=400 error=bad_request"), running.log_text()


def test_a_denied_upload_the_client_gives_up_counts_as_the_deny(
    world: World, proxy: StartProxy
) -> None:
    """curl and Go end an upload once a final answer comes: the 403 that went out whole is
    what the request is counted and logged as, error empty, however the client leaves."""
    running = proxy(policy(), "--namespace", "egress-test")
    with world.connect(world.host("httpbin.org").v4, 80) as sock:
        sock.sendall(
            b"POST /post HTTP/1.1\r\nHost: httpbin.org\r\nContent-Length: 10000000\r\n\r\n"
            + b"x" * 65536
        )
        assert _read_head(sock).startswith(b"HTTP/1.1 403 ")
    assert running.logged(r"access .* protocol=http1 .* status=403 error=- "), running.log_text()
    text = metrics_text(world)
    statuses = "outbound_http_route_request_statuses_total"
    assert metric(text, statuses, http_status="403", error="") == 1
    assert metric(text, statuses, http_status="403") == 1


def test_a_grpc_call_over_http1_refused_for_its_head_gets_the_grpc_code_of_that_cause(
    world: World, proxy: StartProxy
) -> None:
    """On a port of GRPCRoutes an HTTP/1 call whose head is past --max-header-bytes is
    answered 431 and counted RESOURCE_EXHAUSTED, as the same call over h2 is."""
    running = proxy(
        GRPC_POLICY.format(port=GRPC_PORT),
        "--namespace",
        "egress-test",
        "--max-header-bytes",
        "4096",
    )
    with world.connect(world.host("example.test").v4, GRPC_PORT) as sock:
        sock.sendall(
            b"POST /test.Echo/Echo HTTP/1.1\r\nHost: example.test\r\n"
            b"Content-Type: application/grpc\r\nX-Big: %s\r\nContent-Length: 0\r\n\r\n"
            % (b"a" * 6000)
        )
        assert _read_head(sock).startswith(b"HTTP/1.1 431 ")
    assert running.logged(r"access .* protocol=grpc .* status=8 error=header_too_large ")
    text = metrics_text(world)
    exhausted = metric(
        text,
        "outbound_grpc_route_request_statuses_total",
        grpc_status="RESOURCE_EXHAUSTED",
        error="header_too_large",
    )
    assert exhausted == 1


ONLY_GITHUB = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {namespace: egress-test, name: github-only}
spec:
  trafficPolicy: Deny
  networks:
  - cidr: 203.0.113.20/32
"""


def test_http_to_an_address_no_network_covers_passes_untouched(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    """Not egress, so not read: an h2c upgrade, which the HTTP handler would take out of a
    request it forwards, reaches the server and is spliced after its 101."""
    running = proxy(ONLY_GITHUB, "--namespace", "egress-test")
    sock = world.connect(world.host("example.test").v4, H1_PORT)
    try:
        sock.sendall(
            b"GET /chat HTTP/1.1\r\nHost: example.test\r\nConnection: Upgrade, HTTP2-Settings"
            b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
        assert _read_head(sock).startswith(b"HTTP/1.1 101 ")
        sock.sendall(b"PRI * HTTP/2.0 as opaque bytes")
        assert recv_exactly(sock, 30, TIMEOUT) == b"PRI * HTTP/2.0 as opaque bytes"
    finally:
        sock.close()
    untouched = (
        r"access client=\S+ destination=203\.0\.113\.40:8080 protocol=http1 "
        r"hostname=example\.test ech=false route=- decision=allow "
    )
    assert running.logged(untouched), running.log_text()
    assert "method=GET" not in running.log_text()


def _read_head(sock: socket.socket) -> bytes:
    sock.settimeout(TIMEOUT)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, head
        head += byte
    return head


def test_502_and_504(world: World, proxy: StartProxy) -> None:
    run_proxy(proxy, policy(81), "--connect-timeout", "1")
    result = world.curl(
        "--http1.1", "-w", "%{http_code}", "-o", "/dev/null", "http://httpbin.org:81/get"
    )
    assert result.stdout == b"502"
    run_proxy_504 = world.curl(
        "--http1.1", "-w", "%{http_code}", "-o", "/dev/null", f"http://{BLACKHOLE_V4}:81/get"
    )
    assert run_proxy_504.stdout == b"504"
    text = metrics_text(world)
    assert (
        metric(
            text,
            "outbound_http_route_request_statuses_total",
            http_status="502",
            error="connect_refused",
        )
        == 1
    )
    assert (
        metric(
            text,
            "outbound_http_route_request_statuses_total",
            http_status="504",
            error="connect_timeout",
        )
        == 1
    )


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /get HTTP/1.1\r\nHost: httpbin.org\r\nno colon here\r\n\r\n", 400),
        (b"GET /get HTTP/1.1\r\nHost: httpbin.org\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431),
        (b"GET /get HTTP/1.1\r\nHost: httpbin.org\r\nX-Slow: 1\r\n", 408),
    ],
)
def test_bad_heads_get_400_431_408(
    world: World, proxy: StartProxy, head: bytes, status: int
) -> None:
    run_proxy(proxy, policy(), "--header-timeout", "1")
    sock = world.connect(world.host("httpbin.org").v4, 80)
    try:
        sock.sendall(b"GET /get HTTP/1.1\r\nHost: httpbin.org\r\n\r\n")
        first = _read_head(sock)
        length = int(re.search(rb"(?i)content-length: (\d+)", first).group(1))  # type: ignore[union-attr]
        recv_exactly(sock, length, TIMEOUT)
        sock.sendall(head)
        answer = recv_until_eof(sock, TIMEOUT)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 %d " % status)


def test_a_first_head_the_client_ends_early_gets_400(world: World, proxy: StartProxy) -> None:
    """A head cut short by the client's EOF is refused, not relayed as opaque bytes past
    the HTTP rules (policy(): only GET /get and a few paths are allowed)."""
    running = proxy(policy(), "--namespace", "egress-test")
    sock = world.connect(world.host("httpbin.org").v4, 80)
    try:
        sock.sendall(b"GET /admin HTTP/1.1\r\nHost: httpbin.org\r\n")
        sock.shutdown(socket.SHUT_WR)
        answer = recv_until_eof(sock, TIMEOUT)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert running.logged(r"error=bad_request"), running.log_text()


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET  /admin HTTP/1.1\r\nHost: httpbin.org\r\n\r\n", 400),
        (
            b"\r\nGET /admin HTTP/1.1\r\nHost: httpbin.org\r\n\r\n",
            403,
        ),  # empty lines first: skipped, decided
        (b"get /admin HTTP/1.1\r\nHost: httpbin.org\r\n\r\n", 403),
        (b"GET\r/admin HTTP/1.1\r\nHost: httpbin.org\r\n\r\n", 400),  # http.server's split
        (b"GET /admin?\x01 HTTP/1.1\r\nHost: httpbin.org\r\n\r\n", 400),
        (  # a method of any length (h11, Go): decided, not spliced past the rules
            b"X" * 200 + b" /admin HTTP/1.1\r\nHost: httpbin.org\r\nContent-Length: 1\r\n\r\nx",
            403,
        ),
    ],
)
def test_an_irregular_request_line_is_http(
    world: World, proxy: StartProxy, head: bytes, status: int
) -> None:
    """Lenient servers take these for requests: they are refused or decided as HTTP,
    never relayed as opaque bytes (policy(): /admin is not allowed). The proxy's own
    access line shows it answered, not the origin."""
    running = proxy(policy(), "--namespace", "egress-test")
    sock = world.connect(world.host("httpbin.org").v4, 80)
    try:
        sock.sendall(head)
        assert _read_head(sock).startswith(b"HTTP/1.1 %d " % status)
    finally:
        sock.close()
    assert running.logged(rf"access .*status={status}"), running.log_text()


PIECE_SIZE = 3
PIECE_PAUSE = 0.002
"""A head sent this many bytes at a time, this many seconds apart: reads of a few bytes."""


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /get HTTP/1.1\r\nHost: httpbin.org\r\nX-Long: " + b"a" * 200 + b"\r\n\r\n", 200),
        (b"GET /admin HTTP/1.1\r\nHost: httpbin.org\r\nX-Short: a\r\n\r\n", 403),
        (b"\r\n\r\nGET /admin HTTP/1.1\r\nHost: httpbin.org\r\n\r\n", 403),
        (b"get /admin HTTP/1.1\r\nHost: httpbin.org\r\n\r\n", 403),
        (b"GET  /admin HTTP/1.1\r\nHost: httpbin.org\r\n\r\n", 400),
    ],
    ids=["allowed", "denied", "empty-lines-first", "irregular", "doubled-space"],
)
def test_a_head_that_comes_a_few_bytes_at_a_time_is_decided_as_whole(
    world: World, proxy: StartProxy, head: bytes, status: int
) -> None:
    """The sniffer reads a first flight that comes in many reads only as far as each read
    can change its answer: through the real redirect, the answers are those of the head
    sent at once (test_an_irregular_request_line_is_http), given as the head comes, not
    when the head timeout gives up on it (the handler would then answer the same)."""
    running = proxy(policy(), "--namespace", "egress-test")
    sock = world.connect(world.host("httpbin.org").v4, 80)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(head), PIECE_SIZE):
            sock.sendall(head[start : start + PIECE_SIZE])
            time.sleep(PIECE_PAUSE)
        assert _read_head(sock).startswith(b"HTTP/1.1 %d " % status)
        timed_out = metric(
            metrics_text(world), "egress_sniff_outcomes_total", outcome=HEADER_TIMEOUT
        )
    finally:
        sock.close()
    assert running.logged(rf"access .*status={status}"), running.log_text()
    assert timed_out == 0, "decided by the head timeout, on the head as it stood then"


def test_a_path_is_decided_normalised_and_sent_as_it_came(world: World, proxy: StartProxy) -> None:
    """`/get/x/../y` is `/get/y` to the policy (only /get and a few prefixes are allowed),
    and the origin still gets the target the client sent. A path with dot segments must
    be allowed as written too (a server may route it unresolved): `/x/../get` is not."""
    run_proxy(proxy, policy())
    conn = connection(world, "httpbin.org")
    try:
        status, body = request(conn, "GET", "/get/x/../y", "httpbin.org")
        assert status == 200, body
        assert json.loads(body)["path"] == "/get/x/../y"
        assert request(conn, "GET", "/get/../admin", "httpbin.org")[0] == 403
        assert request(conn, "GET", "/x/../get", "httpbin.org")[0] == 403
    finally:
        conn.close()


PATH_SPELLINGS = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: spellings}
spec:
  default: allow
  rules:
  - name: no-cafe
    action: deny
    http: [{path: /café}]
  - name: no-admin
    action: deny
    http: [{pathRegex: "/admin.*"}]
"""


@pytest.mark.usefixtures("http_servers")
@pytest.mark.parametrize(
    ("version", "origin"),
    [
        ("--http1.1", "http://httpbin.org"),
        ("--http2-prior-knowledge", f"http://example.test:{H2_PORT}"),
    ],
)
def test_paths_are_decided_by_the_bytes_curl_sends(
    world: World, proxy: StartProxy, version: str, origin: str
) -> None:
    """`/café` in the policy is the path a client asks for with `/caf%C3%A9` (its UTF-8);
    `/caf%E9` (é in latin-1) is another path. `/admin.*` takes `/admin/%FF` (no UTF-8)
    and `/admin/%0Ax` (a newline, which `.` matches here)."""
    run_proxy(proxy, PATH_SPELLINGS)
    cases = [
        ("/caf%C3%A9", b"403"),
        ("/caf%c3%a9", b"403"),
        ("/caf%E9", b"200"),
        ("/admin/%FF", b"403"),
        ("/admin/%0Ax", b"403"),
        ("/public", b"200"),
    ]
    for path, status in cases:
        result = world.curl(version, "-o", "/dev/null", "-w", "%{http_code}", origin + path)
        assert result.stdout == status, (path, result)


@pytest.mark.parametrize(
    "target", ["/caf%C3%A9#", "caf%C3%A9", "*", "http://httpbin.org:81/caf%C3%A9"]
)
def test_a_target_a_server_reads_otherwise_is_refused(
    world: World, proxy: StartProxy, target: str
) -> None:
    """nginx ends a path at `#` (`/café#` is the denied `/café` there), some servers take
    `café` for `/café`, `*` is OPTIONS' alone, and an absolute form naming another port
    than the Host's names another server to one who reads the Host: 400, never a decision
    the upstream reads otherwise."""
    run_proxy(proxy, PATH_SPELLINGS)
    sock = world.connect(world.host("httpbin.org").v4, 80)
    try:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: httpbin.org\r\n\r\n".encode())
        assert _read_head(sock).startswith(b"HTTP/1.1 400 ")
    finally:
        sock.close()


HTTPBIN_DENIED = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: no-httpbin}
spec:
  default: allow
  rules:
  - name: no-httpbin
    hosts: [httpbin.org]
    action: deny
"""


@pytest.mark.parametrize(
    ("version", "url"),
    [("--http1.1", "http://httpbin.org/get"), ("--http2-prior-knowledge", H2_URL)],
)
def test_a_host_with_an_empty_port_is_that_host_and_a_malformed_one_is_refused(
    world: World, proxy: StartProxy, http_servers: None, version: str, url: str
) -> None:
    """curl sends Host or :authority as given: `httpbin.org:` is httpbin.org, denied, and
    `httpbin.org:80:80`, no host[:port], is refused rather than allowed by default."""
    run_proxy(proxy, HTTPBIN_DENIED)
    codes = []
    for host in ("example.test", "httpbin.org:", "httpbin.org:80:80"):
        result = world.curl(
            version, "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {host}", url
        )
        assert result.returncode == 0, result
        codes.append(result.stdout.decode())
    assert codes == ["200", "403", "400"]


OSM_EGRESS_TO_EXAMPLE = f"""\
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {{name: osm-mesh-config, namespace: osm-system}}
spec:
  traffic: {{enableEgress: false}}
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: {{name: example, namespace: curl}}
spec:
  sources: [{{kind: ServiceAccount, name: curl, namespace: curl}}]
  hosts: [example.test]
  ports: [{{number: 80, protocol: http}}, {{number: {H2_PORT}, protocol: http}}]
"""


@pytest.mark.parametrize(
    ("version", "url", "port"),
    [
        ("--http1.1", "http://example.test/get", 80),
        ("--http2-prior-knowledge", H2_URL, H2_PORT),
    ],
)
def test_an_osm_egress_host_takes_its_own_port_in_host_and_no_other(
    world: World, proxy: StartProxy, http_servers: None, version: str, url: str, port: int
) -> None:
    """OSM's Envoy domains for an http Egress host are HOST and HOST:PORT: curl's Host (or
    :authority) naming another port matches no Egress and gets the default deny."""
    proxy(OSM_EGRESS_TO_EXAMPLE, "--namespace", "curl", "--service-account", "curl")
    codes = []
    for host in ("example.test", f"example.test:{port}", "example.test:1"):
        result = world.curl(
            version, "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {host}", url
        )
        assert result.returncode == 0, result
        codes.append(result.stdout.decode())
    assert codes == ["200", "200", "403"]


OSM_TCP_EGRESS_ON_80 = """\
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: {name: tcp-80, namespace: curl}
spec:
  sources: [{kind: ServiceAccount, name: curl, namespace: curl}]
  ports: [{number: 80, protocol: tcp}]
"""


def test_an_osm_tcp_egress_leaves_http_to_the_http_egress_of_its_port(
    world: World, proxy: StartProxy
) -> None:
    """OSM's Envoy takes plaintext HTTP on a port with an http Egress to its HTTP filter
    chain, whose hosts alone decide (a tcp Egress on that port is another chain)."""
    proxy(
        OSM_EGRESS_TO_EXAMPLE + OSM_TCP_EGRESS_ON_80,
        "--namespace",
        "curl",
        "--service-account",
        "curl",
    )
    codes = []
    for host in ("example.test", "other.test"):
        result = world.curl(
            "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Host: {host}", "http://example.test/"
        )
        assert result.returncode == 0, result
        codes.append(result.stdout.decode())
    assert codes == ["200", "403"]


def test_linkerd_guide_redirect_section(world: World, proxy: StartProxy) -> None:
    run_proxy(proxy, REDIRECT_GUIDE.read_text())
    conn = connection(world, "httpbin.org")
    try:
        status, body = request(conn, "GET", "/get", "httpbin.org")
        assert (status, json.loads(body)["server"]["name"]) == (200, "httpbin.org")
        status, body = request(conn, "GET", "/ip", "httpbin.org")
        document = json.loads(body)
        assert document["server"]["name"] == "internal-egress.egress-test.svc.cluster.local"
        assert document["host"] == "httpbin.org"
        status, body = request(conn, "GET", "/get", "httpbin.org")
        assert json.loads(body)["server"]["name"] == "httpbin.org"
    finally:
        conn.close()
    result = world.curl("--http1.1", "http://google.com")
    document = json.loads(result.stdout)
    assert document["server"]["name"] == "internal-egress.egress-test.svc.cluster.local"
    assert document["host"] == "google.com"
    text = metrics_text(world)
    assert (
        metric(
            text,
            "outbound_http_route_request_statuses_total",
            route_name="unencrypted-http",
            hostname="google.com",
            http_status="200",
        )
        == 1
    )


def test_sigterm_finishes_the_request_in_flight(world: World, proxy: StartProxy) -> None:
    started = proxy(policy(), "--namespace", "egress-test")
    conn = connection(world, "httpbin.org")
    try:
        total = 64 << 20
        conn.request("GET", f"/bytes/{total}", headers={"Host": "httpbin.org"})
        response = conn.getresponse()
        first = response.read(1 << 20)
        started.send_signal(signal.SIGTERM)
        rest = response.read()
        assert hashlib.sha256(first + rest).hexdigest() == stream_sha256(total)
        with contextlib.suppress(ConnectionError, http.client.HTTPException):
            request(conn, "GET", "/get", "httpbin.org")
    finally:
        conn.close()
    assert started.wait(STOP_TIMEOUT) == 0


def test_sigterm_keeps_the_end_of_an_h2_stream_a_slow_reader_still_reads(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    """A slow h2 reader acknowledges each DATA frame as it reads it. When the drain let its
    download finish, the proxy closed with those WINDOW_UPDATEs unread, the kernel reset the
    connection and dropped the last frames not yet sent, END_STREAM with them; the log said
    200. GOAWAY frames are taken out before h2 sees them (it refuses every frame after
    one, the answers of streams in flight too)."""
    import h2.connection
    import h2.events
    import h2.settings

    running = proxy(policy(H2_PORT), "--namespace", "egress-test")
    size = 4 << 20
    client = h2.connection.H2Connection()
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    client.increment_flow_control_window(1 << 20)
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"),
                            (":authority", f"example.test:{H2_PORT}"),
                            (":path", f"/bytes/{size}")], end_stream=True)  # fmt: skip
    sock = world.connect(world.host("example.test").v4, H2_PORT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    received, ended, unread = 0, False, bytearray()
    deadline = time.monotonic() + 3 * TIMEOUT
    try:
        sock.sendall(client.data_to_send())
        while not ended and time.monotonic() < deadline:
            data = sock.recv(4096)
            if not data:
                break
            unread += data
            frames = bytearray()
            while len(unread) >= 9 and len(unread) >= 9 + int.from_bytes(unread[:3], "big"):
                size_of = 9 + int.from_bytes(unread[:3], "big")
                if unread[3] != 7:  # GOAWAY
                    frames += unread[:size_of]
                del unread[:size_of]
            for event in client.receive_data(bytes(frames)):
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)
                    client.acknowledge_received_data(event.flow_controlled_length, 1)
                    if received >= 256 * 1024 and received - len(event.data) < 256 * 1024:
                        running.send_signal(signal.SIGTERM)
                ended = ended or isinstance(event, h2.events.StreamEnded)
            sock.sendall(client.data_to_send())
            time.sleep(0.002)
    finally:
        sock.close()
    assert (received, ended) == (size, True)
    assert running.wait(STOP_TIMEOUT) == 0


FULL_PIPE = 48 << 10
"""A pipe holds 64 KiB, less what its pages leave unfilled; the lines of the requests
below are ten times that."""
UNREAD_REQUESTS = 1_000


def test_a_proxy_whose_stderr_nobody_reads_serves_and_exits_on_sigterm(
    world: World, proxy: StartProxy
) -> None:
    """Once its stderr pipe is full, the proxy keeps serving (lines wait, bounded, or are
    dropped) and a SIGTERM still ends it with 0: the log writer is given up on."""
    started = proxy(policy(), "--namespace", "egress-test", output_unread=True)
    conn = connection(world, "httpbin.org")
    long_path = "/get?" + "padding=" + "x" * 400
    try:
        for _ in range(UNREAD_REQUESTS):
            assert request(conn, "GET", long_path, "httpbin.org")[0] == 200
    finally:
        conn.close()
    assert started.unread_output_bytes() >= FULL_PIPE
    started.send_signal(signal.SIGTERM)
    assert started.wait(STOP_TIMEOUT) == 0


# --- HTTP/2 cleartext and gRPC ---------------------------------------------------


def test_curl_http2_prior_knowledge(world: World, proxy: StartProxy, http_servers: None) -> None:
    """One curl per request: curl 7.88 fails reusing an h2c connection even talking directly
    to the h2 server (the h2 unit tests cover multiplexing on one connection)."""
    run_proxy(proxy, policy(H2_PORT))
    answers = []
    for path in ("/get", "/nope", "/get?a=b"):
        result = world.curl(
            "--http2-prior-knowledge",
            "-w",
            "\\n%{http_version} %{http_code}",
            f"http://example.test:{H2_PORT}{path}",
        )
        assert result.returncode == 0, result
        answers.append(result.stdout.decode().rpartition("\n"))
    assert [status for _, _, status in answers] == ["2 200", "2 403", "2 200"]
    first = json.loads(answers[0][0])
    assert [":authority", f"example.test:{H2_PORT}"] in first["headers"]
    assert [":path", "/get"] in first["headers"]
    assert answers[1][0] == "traffic not allowed\n"
    text = metrics_text(world)
    assert (
        metric(
            text,
            "outbound_http_route_request_statuses_total",
            route_name="http-egress-deny",
            http_status="403",
        )
        == 1
    )


def grpc_call(
    world: World,
    method: str,
    payload: str,
    port: int = GRPC_PORT,
    host: str = "example.test",
    metadata_bytes: int = 0,
) -> dict[str, Any]:
    return grpc_client(
        world,
        ["--call", f"{host}:{port}", method, payload, "--metadata-bytes", str(metadata_bytes)],
        timeout=20,
    )


def grpc_client(world: World, arguments: list[str], timeout: float) -> dict[str, Any]:
    """http_servers.py as a gRPC client in the client namespace: its JSON outcome."""
    result = world.run(
        [
            "env",
            "GRPC_DNS_RESOLVER=native",
            sys.executable,
            str(Path(__file__).with_name("http_servers.py")),
            *arguments,
        ],
        timeout=timeout,
    )
    assert result.returncode == 0, result
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_grpcio_allowed_and_denied(world: World, proxy: StartProxy, http_servers: None) -> None:
    run_proxy(proxy, GRPC_POLICY.format(port=GRPC_PORT))
    assert grpc_call(world, "/test.Echo/Echo", "hello") == {"code": "OK", "response": "hello"}
    assert grpc_call(world, "/test.Echo/Fail", "x") == {
        "code": "PERMISSION_DENIED",
        "response": None,
    }
    text = metrics_text(world)
    assert (
        metric(
            text,
            "outbound_grpc_route_request_statuses_total",
            route_name="echo-only",
            grpc_status="OK",
        )
        == 1
    )
    assert (
        metric(
            text,
            "outbound_grpc_route_request_statuses_total",
            route_name="grpc-egress-deny",
            grpc_status="PERMISSION_DENIED",
        )
        == 1
    )


GRPC_STREAMS = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {{name: streams}}
spec:
  default: deny
  rules:
  - name: echo
    ports: [{port}]
    grpc: [{{service: test.Echo}}]
"""


def test_grpc_streams_finish_on_connections_their_server_ages_out(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    """A gRPC server at max_connection_age (500 ms here) says GOAWAY and closes once its
    last answer is written, some of it still unsent while the proxy reads slowly. The
    proxy's WINDOW_UPDATEs reaching it after that close made its kernel abort the
    connection and drop the rest: about one streaming call in twenty failed INTERNAL
    through the redirect, none directly. Every call must get every message."""
    run_proxy(proxy, GRPC_STREAMS.format(port=GRPC_AGED_PORT))
    outcomes = grpc_client(world, ["--streams", f"example.test:{GRPC_AGED_PORT}", "5"], 60)
    assert set(outcomes) == {"OK"}, outcomes
    assert outcomes["OK"] >= 20, "calls outlived connections, several of them each"


GRPC_OR_OPEN = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {{name: grpc-or-open}}
spec:
  default: deny
  rules:
  - name: echo
    ports: [{port}]
    grpc: [{{service: test.Echo}}]
  - name: open
    ports: [{port}]
    http: [{{pathPrefix: /open}}]
"""


def test_a_content_type_that_only_begins_like_grpcs_is_no_call(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    """On a port of gRPC and HTTP rules, application/grpcx is plain HTTP, which the gRPC
    rule does not allow; it passed that rule as a call. (A Linkerd GRPCRoute fixes its
    port's protocol, so there every request is a call, whatever its content-type.)"""
    run_proxy(proxy, GRPC_OR_OPEN.format(port=GRPC_PORT))
    url = f"http://example.test:{GRPC_PORT}/test.Echo/Echo"
    statuses = {}
    for content_type in ("application/grpcx", "application/grpc+proto"):
        result = world.curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
                            "-X", "POST", "-H", f"content-type: {content_type}", url)  # fmt: skip
        statuses[content_type] = result.stdout.decode()
    assert statuses == {"application/grpcx": "403", "application/grpc+proto": "200"}


def test_an_h2_head_trickled_past_the_header_timeout_ends_its_connection(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    """--header-timeout holds for h2 heads too: with no stream to answer 408 on, a GOAWAY
    and the end of the connection, where a trickled head held it for the idle timeout."""
    import h2.connection

    running = proxy(policy(H2_PORT), "--namespace", "egress-test", "--header-timeout", "1")
    client = h2.connection.H2Connection()
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"),
                            (":authority", f"example.test:{H2_PORT}"), (":path", "/get")],
                        end_stream=True)  # fmt: skip
    data = client.data_to_send()
    sock = world.connect(world.host("example.test").v4, H2_PORT)
    try:
        sock.sendall(data[:-4])
        started = time.monotonic()
        for byte in data[-4:-1]:  # a byte every 0.3 s, never the last
            time.sleep(0.3)
            sock.sendall(bytes([byte]))
        answer = recv_until_eof(sock, TIMEOUT)
        ended = time.monotonic() - started
    finally:
        sock.close()
    goaway_type = 7
    kinds = []
    while len(answer) >= 9:
        length = int.from_bytes(answer[:3], "big")
        kinds.append(answer[3])
        answer = answer[9 + length :]
    assert goaway_type in kinds, kinds
    assert 1.0 <= ended < 5.0, ended
    assert running.logged("h2 request head incomplete after 1.0s"), running.log_text()


def test_a_grpc_route_without_rules_opens_nothing(world: World, proxy: StartProxy) -> None:
    """A GRPCRoute's CRD fills in no default rule, and linkerd2-proxy matches nothing on a
    route without rules: through the redirect, a GRPCRoute naming only its hostname lets
    no request through a Deny network (it let every HTTP request through)."""
    rule_less = GRPC_POLICY.format(port=80).split("  rules:")[0] + "  hostnames: [httpbin.org]\n"
    run_proxy(proxy, rule_less)
    conn = connection(world, "httpbin.org")
    try:
        assert request(conn, "GET", "/get", "httpbin.org")[0] == 403
    finally:
        conn.close()


def test_grpcio_metadata_past_max_header_bytes_is_resource_exhausted(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    """grpcio's call with metadata past --max-header-bytes gets RESOURCE_EXHAUSTED, as from
    a gRPC server, not an HTTP 431 it would report as UNKNOWN; the next call goes through."""
    run_proxy(proxy, GRPC_POLICY.format(port=GRPC_PORT), "--max-header-bytes", "4096")
    big = grpc_call(world, "/test.Echo/Echo", "x", metadata_bytes=6000)
    assert big == {"code": "RESOURCE_EXHAUSTED", "response": None}
    assert grpc_call(world, "/test.Echo/Echo", "y") == {"code": "OK", "response": "y"}
    text = metrics_text(world)
    exhausted = metric(
        text,
        "outbound_grpc_route_request_statuses_total",
        route_name="echo-only",
        grpc_status="RESOURCE_EXHAUSTED",
        error="header_too_large",
    )
    assert exhausted == 1


NATIVE_GRPC_BESIDE_A_HOST_DENY = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: standalone
spec:
  default: deny
  rules:
  - name: echo
    ports: [{port}]
    grpc:
    - service: test.Echo
  - name: no-www
    hosts: [www.example.test]
    action: deny
"""


def test_a_native_host_deny_holds_against_a_grpc_allow_for_any_host(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    """grpcio through the redirect: a gRPC call to a host a native rule denies is denied,
    though a `grpc` rule allows its service for any host (it once met the gRPC rules alone)."""
    run_proxy(proxy, NATIVE_GRPC_BESIDE_A_HOST_DENY.format(port=GRPC_PORT))
    assert grpc_call(world, "/test.Echo/Echo", "hi") == {"code": "OK", "response": "hi"}
    assert grpc_call(world, "/test.Echo/Echo", "hi", host="www.example.test") == {
        "code": "PERMISSION_DENIED",
        "response": None,
    }
    text = metrics_text(world)
    for route, status in (("standalone.echo", "OK"), ("standalone.no-www", "PERMISSION_DENIED")):
        assert (
            metric(
                text,
                "outbound_grpc_route_request_statuses_total",
                route_name=route,
                grpc_status=status,
            )
            == 1
        )


NATIVE_GRPC_DENY_BESIDE_HTTP = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: standalone
spec:
  default: allow
  rules:
  - name: no-fail
    ports: [{port}]
    grpc:
    - service: test.Echo
      method: Fail
    action: deny
  - name: web
    ports: [{port}]
    http:
    - pathPrefix: /
"""


def test_a_grpc_deny_holds_against_a_call_sent_without_its_content_type(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    """grpcio serves a call whose content-type is not application/grpc: curl's POST of the
    denied method with another content-type, through the redirect, is denied (it used to
    be decided as plain HTTP, allowed by the `http` rule, and served)."""
    run_proxy(proxy, NATIVE_GRPC_DENY_BESIDE_HTTP.format(port=GRPC_PORT))
    result = world.curl(
        "--http2-prior-knowledge",
        "-H",
        "content-type: application/json",
        "--data-binary",
        "x",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        f"http://example.test:{GRPC_PORT}/test.Echo/Fail",
    )
    assert (result.returncode, result.stdout) == (0, b"403")
    text = metrics_text(world)
    assert (
        metric(
            text,
            "outbound_grpc_route_request_statuses_total",
            route_name="standalone.no-fail",
            grpc_status="PERMISSION_DENIED",
        )
        == 1
    )


NATIVE_HOST_DENY = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: standalone
spec:
  default: allow
  rules:
  - name: no-www
    hosts: [www.example.test]
    action: deny
"""


def test_a_grpc_call_denied_on_an_http_route_counts_as_a_deny(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    """No gRPC rule: the call's route is an HTTP one. grpcio gets PERMISSION_DENIED
    (trailers-only, HTTP 200 on the wire), and the HTTP family counts it 403, not 200."""
    run_proxy(proxy, NATIVE_HOST_DENY)
    assert grpc_call(world, "/test.Echo/Echo", "hi", host="www.example.test") == {
        "code": "PERMISSION_DENIED",
        "response": None,
    }
    labels = {"route_name": "standalone.no-www", "hostname": "www.example.test", "error": ""}
    text = metrics_text(world)
    assert metric(text, "outbound_http_route_request_statuses_total", **labels) == 1
    assert (
        metric(text, "outbound_http_route_request_statuses_total", http_status="403", **labels) == 1
    )


def test_grpc_upstream_unreachable_is_unavailable(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    closed = GRPC_PORT + 1
    run_proxy(proxy, GRPC_POLICY.format(port=closed))
    assert grpc_call(world, "/test.Echo/Echo", "x", closed) == {
        "code": "UNAVAILABLE",
        "response": None,
    }
    text = metrics_text(world)
    assert (
        metric(
            text,
            "outbound_grpc_route_request_statuses_total",
            route_name="echo-only",
            grpc_status="UNAVAILABLE",
            error="connect_refused",
        )
        >= 1
    )


def test_h2c_download_respects_flow_control(
    world: World, proxy: StartProxy, http_servers: None
) -> None:
    run_proxy(proxy, policy(H2_PORT))
    total = 64 << 20
    result = world.curl(
        "--http2-prior-knowledge", f"http://example.test:{H2_PORT}/bytes/{total}", timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == stream_sha256(total)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /get HTTP/1.1\r\nHost: httpbin.org\r\nHost: github.com\r\n\r\n",
        b"GET /get HTTP/1.1\r\nHost: httpbin.org\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",
    ],
)
def test_a_bad_first_head_is_answered_not_relayed(
    world: World, proxy: StartProxy, head: bytes
) -> None:
    run_proxy(proxy, policy())
    sock = world.connect(world.host("httpbin.org").v4, 80)
    try:
        sock.sendall(head)
        answer = recv_until_eof(sock, TIMEOUT)
    finally:
        sock.close()
    assert re.match(rb"HTTP/1\.1 (400|431) ", answer), answer[:200]


@pytest.mark.parametrize("port", [80, H2_PORT])
def test_a_client_that_reads_nothing_keeps_proxy_memory_bounded(
    world: World, proxy: StartProxy, http_servers: None, port: int
) -> None:
    """256 MiB offered by the server, nothing read by the client: reading the upstream pauses
    (HTTP/1: transport backpressure; h2: the client's window is never reopened)."""
    running = proxy(policy(port), "--namespace", "egress-test")
    address = world.host("httpbin.org").v4
    warm_up = world.curl(
        *(["--http2-prior-knowledge"] if port == H2_PORT else ["--http1.1"]),
        "-o", "/dev/null", f"http://httpbin.org:{port}/bytes/{8 << 20}",
    )  # fmt: skip
    assert warm_up.returncode == 0, warm_up
    baseline = running.rss_bytes()
    sock = world.connect(address, port)
    try:
        if port == H2_PORT:
            sock.sendall(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS
                + h2_get_frame(f"/bytes/{256 << 20}", f"httpbin.org:{port}")
            )
        else:
            sock.sendall(f"GET /bytes/{256 << 20} HTTP/1.1\r\nHost: httpbin.org\r\n\r\n".encode())
        time.sleep(1.5)
        growth = running.rss_bytes() - baseline
        recv_exactly(sock, 1 << 16, TIMEOUT)
    finally:
        sock.close()
    assert growth < 32 << 20, f"the proxy grew {growth >> 20} MiB for a reader that reads nothing"


def h2_get_frame(path: str, authority: str) -> bytes:
    """A HEADERS frame (END_STREAM, END_HEADERS) for GET path on stream 1, by hpack."""
    import hpack

    block = hpack.Encoder().encode(
        [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", path)]
    )
    return len(block).to_bytes(3, "big") + b"\x01\x05" + (1).to_bytes(4, "big") + block


def proxy_ports_to(world: World, address: str, state: str) -> set[int]:
    """The proxy's source ports of the sockets towards address:80 in an `ss` state."""
    listing = world.run(["ss", "-Htan", "state", state, "dst", f"{address}:80"])
    local_ports = {
        int(line.split()[-2].rsplit(":", 1)[1]) for line in listing.stdout.decode().splitlines()
    }
    return {port for port in local_ports if port in PROXY_SOURCE_PORTS}


@pytest.mark.parametrize("connection", ["close", "keep-alive"])
def test_upstreams_the_proxy_lets_go_hold_no_source_port(
    world: World, proxy: StartProxy, connection: str
) -> None:
    """Closing or keep-alive requests, each on its own client connection: the proxy resets
    the upstreams it is done with, so none of its source ports waits out TIME_WAIT."""
    proxy()
    address = str(world.host("httpbin.org").v4)
    # Sockets an earlier test's proxy left closing may reach TIME_WAIT during this one.
    before = proxy_ports_to(world, address, "all")
    for _ in range(10):
        result = world.curl(
            "-4", "-H", f"Connection: {connection}", "-o", "/dev/null", "-w", "%{http_code}",
            "http://httpbin.org/get",
        )  # fmt: skip
        assert result.stdout == b"200", result
    assert not proxy_ports_to(world, address, "time-wait") - before
