"""A proxy on loopback for the HTTP handler tests: the real Flow, policy and handlers.

Only the original destination is given instead of read with SO_ORIGINAL_DST (there
is no redirect on loopback): every connection to the proxy "was meant for" the
origin the test names.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from egressproxy import flow as flow_module
from egressproxy.flow import Flow, FlowContext, OpenFlows
from egressproxy.metrics import exposition
from egressproxy.policy.decision import Destination
from egressproxy.policy.store import PolicyStore
from egressproxy.records import FlowRecord, RequestRecord
from egressproxy.settings import Settings


def local(port: int) -> Destination:
    """An origin on 127.0.0.1: what a test's connections "were meant for"."""
    return Destination(ipaddress.ip_address("127.0.0.1"), port)


def closed_port() -> int:
    """A loopback port nothing listens on: a connect to it is refused."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return int(unused.getsockname()[1])


@contextlib.contextmanager
def names_never_resolve(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every getaddrinfo (the lookup threads') hangs until the block ends, 5 s at most:
    a route's backend lookup runs into the connect timeout (dns_timeout)."""
    release = threading.Event()

    def never_answers(*args: object, **kwargs: object) -> list[object]:
        release.wait(5.0)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", never_answers)
    try:
        yield
    finally:
        release.set()


def _nothing() -> None:
    """The loopback proxy never pauses accepting."""


@dataclass
class Ledger:
    """Accounting that keeps every record, so tests can check what metrics would get."""

    flows: list[FlowRecord] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    connect_failures: list[str] = field(default_factory=list)
    unconfirmed: list[tuple[str, str, str, int]] = field(default_factory=list)
    """--verify-destination's findings: (error, hostname, mode, times)."""

    def connection_opened(self) -> None:
        """Nothing to count here."""

    def connection_decided(self, record: FlowRecord) -> None:
        """Nothing to count here."""

    def connection_closed(self, record: FlowRecord) -> None:
        self.flows.append(record)

    def request_finished(self, record: RequestRecord) -> None:
        self.requests.append(record)

    def policy_reloaded(self, ok: bool, generation: int) -> None:
        """Nothing to count here."""

    def tasks_counted(self, alive: int) -> None:
        """Nothing to count here."""

    def upstream_failed(self, error: str) -> None:
        self.connect_failures.append(error)

    def destination_unconfirmed(self, error: str, hostname: str, mode: str, times: int) -> None:
        self.unconfirmed.append((error, hostname, mode, times))


@dataclass
class LoopbackProxy:
    host: str
    port: int
    context: FlowContext
    ledger: Ledger
    destination: list[Destination]
    """The original destination every new connection gets (tests may change it)."""

    async def wait_closed_flows(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.ledger.flows) < count:
                await asyncio.sleep(0.01)

    async def wait_requests(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.ledger.requests) < count:
                await asyncio.sleep(0.01)

    async def wait_unconfirmed(self, count: int, timeout: float = 5.0) -> None:
        """Until --verify-destination has reported count findings (log mode reports them
        when the resolver answers, after the traffic has gone on)."""
        async with asyncio.timeout(timeout):
            while len(self.ledger.unconfirmed) < count:
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def loopback_proxy(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy_text: str,
    destination: Destination,
    **settings: object,
) -> AsyncIterator[LoopbackProxy]:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(policy_text)
    config = replace(Settings(), policy_file=policy_file, **settings)  # type: ignore[arg-type]
    store = PolicyStore(config)
    store.load_initial()
    ledger = Ledger()
    context = FlowContext(config, store, OpenFlows(10_000, _nothing, _nothing), ledger)
    chosen = [destination]

    def given_destination(sock: object, peer_host: str) -> Destination:
        return chosen[0]

    monkeypatch.setattr(flow_module, "original_destination", given_destination)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Flow(context), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        yield LoopbackProxy("127.0.0.1", port, context, ledger, chosen)
    finally:
        server.close()
        for open_flow in list(context.open_flows.flows):
            open_flow.abort()
        await asyncio.sleep(0)
        context.resolver.close()


@contextlib.asynccontextmanager
async def origin(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object],
) -> AsyncIterator[int]:
    """A stream server on 127.0.0.1; yields its port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def proxy_to_origin(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy_text: str,
    **settings: object,
) -> AsyncIterator[LoopbackProxy]:
    """A loopback proxy whose every connection was meant for one origin running handler."""
    async with (
        origin(handler) as port,
        loopback_proxy(tmp_path, monkeypatch, policy_text, local(port), **settings) as proxy,
    ):
        yield proxy


ALLOW_ALL = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: test
spec:
  default: allow
"""
"""A native policy that lets everything through: for tests about the data plane alone."""


LOOPBACK_NETWORK = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata:
  namespace: linkerd-egress
  name: loopback
spec:
  networks:
  - cidr: 127.0.0.0/8
  trafficPolicy: Deny
---
"""
"""Linkerd's EgressNetwork `loopback` over 127.0.0.0/8, Deny by default: the first document
of the tests' policies whose routes attach to it (no braces, so theirs can be formatted)."""


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An origin that sends back what it reads."""
    while data := await reader.read(65536):
        writer.write(data)
    writer.close()


class Recording:
    """An origin that keeps every byte it is sent in `received` and never answers."""

    def __init__(self) -> None:
        self.received = bytearray()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.received.extend(data)
        writer.close()


class Silent:
    """An origin that takes what it is sent and never answers; `arrived` is set once the
    first bytes (the request) are in."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                self.arrived.set()
        writer.close()


BLOCKED_HOST = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: test
spec:
  default: allow
  rules:
  - name: blocked
    hosts: [blocked.test, "*.blocked.test"]
    action: deny
"""
"""Default allow, a deny on blocked.test and its subdomains."""


OSM_HTTP_EGRESS = """\
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {{name: osm-mesh-config, namespace: osm-system}}
spec:
  traffic: {{enableEgress: false}}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{name: port-named, namespace: curl}}
spec:
  matches:
  - name: host-with-port
    headers: {{host: 'example\\.test:{port}'}}
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: {{name: example, namespace: curl}}
spec:
  sources: [{{kind: ServiceAccount, name: curl, namespace: curl}}]
  hosts: [example.test]
  ports: [{{number: {port}, protocol: http}}]
{matches}"""
"""OSM egress disabled but for example.test on the origin's port (an http port); format
with port and matches: "" (every request), or HOST_NAMES_PORT (a `host` header match)."""
HOST_NAMES_PORT = (
    "  matches: [{apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: port-named}]"
)
OSM_HOST_CASES = {
    "": {"example.test": 200, "example.test:{port}": 200, "example.test:1": 403, "other.test": 403},
    HOST_NAMES_PORT: {
        "example.test": 403,
        "example.test:{port}": 200,
        "example.test:1": 403,
        "other.test": 403,
    },
}
"""For OSM_HTTP_EGRESS's matches: the status each Host (or :authority) gets, alike in HTTP/1
and HTTP/2. OSM's Envoy domains are example.test and example.test:PORT only, and its `host`
header match reads the whole authority, port included."""


def request_statuses(registry: CollectorRegistry, family: str) -> list[tuple[str, str, str, float]]:
    """(route_name, status, error, count) of each sample of the scrape's `http` or `grpc`
    request family, sorted; the other family must have none."""
    body, _ = exposition(registry, "")
    families = {found.name: found for found in text_string_to_metric_families(body.decode())}
    other = "grpc" if family == "http" else "http"
    assert families[f"outbound_{other}_route_request_statuses"].samples == []
    return sorted(
        (sample.labels["route_name"], sample.labels[f"{family}_status"], sample.labels["error"],
         sample.value)
        for sample in families[f"outbound_{family}_route_request_statuses"].samples
    )  # fmt: skip
