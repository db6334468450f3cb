"""A sketch, not a proxy: egressproxy's own work for one HTTP/1 exchange on plain sockets.

    sketch.py --policy FILE --listen HOST:PORT --admin HOST:PORT

For the new-connection workload only (one request per connection, `Connection: close`):
it does what egressproxy does per such connection -- original destination, sniff, the
connection's decision, the lean request head, the request's decision, connect from a
drawn source port, the lean response head, the records and the metrics -- with
egressproxy's own functions, but on plain sockets in an epoll set that uvloop watches
as one descriptor (floors.py `nested`) instead of uvloop transports, and with nothing
else: no timeouts, drain, backpressure, access log, verification or error answers.
Beside egressproxy-w1 and floor-nested it shows what a connection path rebuilt on plain
sockets could cost, before the work a real one adds back (docs/performance.md).
"""

from __future__ import annotations

import argparse
import select
import socket
from dataclasses import replace
from pathlib import Path

from floors import NestedRelay, address
from prometheus_client import CollectorRegistry

from egressproxy import http1_lean
from egressproxy.flow import _classify
from egressproxy.metrics import Metrics
from egressproxy.netfilter import original_destination
from egressproxy.policy.decision import ConnectionFacts, RequestFacts
from egressproxy.policy.index import PolicyIndex
from egressproxy.policy.store import PolicyStore
from egressproxy.records import FlowRecord, RequestRecord
from egressproxy.relay import RESET_ON_CLOSE
from egressproxy.settings import Settings
from egressproxy.sniff import NEED_MORE
from egressproxy.sniff.detect import sniff
from egressproxy.sniff.http import authority_host

MAX_HEAD = 65536
CHUNK = 262144


class Exchange:
    """One client connection, its one request and its upstream."""

    __slots__ = ("client", "flow", "received", "request", "response_bytes", "upstream", "waiting")

    def __init__(self, client: socket.socket, flow: FlowRecord) -> None:
        self.client = client
        self.flow = flow
        self.received = b""
        self.response_bytes = b""
        self.upstream: socket.socket | None = None
        self.request: RequestRecord | None = None
        self.waiting: http1_lean.LeanRequest | None = None
        """The request head until the upstream's connect completes."""


class Sketch(NestedRelay):
    def __init__(self, listen: tuple[str, int], admin: tuple[str, int], policy: Path) -> None:
        super().__init__(listen, admin)
        store = PolicyStore(replace(Settings(), policy_file=policy))
        store.load_initial()
        self.index: PolicyIndex = store.current.index
        self.metrics = Metrics(CollectorRegistry(), max_hostnames=1000)
        self.clients: dict[int, Exchange] = {}
        self.upstreams: dict[int, Exchange] = {}

    def dispatch(self, fd: int) -> None:
        if (exchange := self.clients.get(fd)) is not None:
            self.client_ready(exchange)
        elif (exchange := self.upstreams.get(fd)) is not None:
            self.upstream_ready(exchange)

    def accept(self) -> None:
        while True:
            try:
                client, peer = self.listener.accept()
            except BlockingIOError:
                return
            client.setblocking(False)
            self.metrics.connection_opened()
            flow = FlowRecord(client=f"{peer[0]}:{peer[1]}")
            flow.destination = original_destination(client, peer[0])
            self.clients[client.fileno()] = Exchange(client, flow)
            self.epoll.register(client.fileno(), select.EPOLLIN)

    def client_ready(self, exchange: Exchange) -> None:
        if exchange.upstream is not None:
            self.finish(exchange)  # the client hung up before its answer
            return
        data = received(exchange.client, MAX_HEAD)
        if data is None:
            return
        if not data:
            self.finish(exchange)
            return
        exchange.received += data
        sniffed = sniff(exchange.received)
        if sniffed is NEED_MORE:
            return
        flow = exchange.flow
        destination = flow.destination
        assert destination is not None
        detected, hostname, outcome = _classify(sniffed, exchange.received)
        flow.detected, flow.hostname, flow.sniff_outcome = detected, hostname, outcome
        flow.decision = self.index.decide_connection(
            ConnectionFacts(destination, detected, hostname)
        )
        self.metrics.connection_decided(flow)
        request = http1_lean.parse_request(exchange.received, MAX_HEAD)
        if not isinstance(request, http1_lean.LeanRequest):
            self.finish(exchange)  # not this sketch's kind of request
            return
        path, _, query = request.target.decode("latin-1").partition("?")
        method = request.method.decode("latin-1")
        host = authority_host(request.host)
        facts = RequestFacts(
            destination, host, method, path, query, request.headers, request.grpc, request.host
        )
        exchange.request = RequestRecord(
            client=flow.client,
            destination=destination,
            protocol="http1",
            hostname=host,
            method=method,
            path=path,
            grpc=False,
            decision=self.index.decide_request(facts),
        )
        flow.bytes_from_client += len(exchange.received)
        upstream = socket.socket()
        upstream.setblocking(False)
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        upstream.bind(("0.0.0.0", self.ports.take()))
        upstream.connect_ex((str(destination.ip), destination.port))
        exchange.upstream, exchange.waiting = upstream, request
        self.upstreams[upstream.fileno()] = exchange
        self.epoll.register(upstream.fileno(), select.EPOLLOUT)
        self.epoll.modify(exchange.client.fileno(), 0)  # its hang-up or error only

    def upstream_ready(self, exchange: Exchange) -> None:
        upstream = exchange.upstream
        assert upstream is not None and exchange.request is not None
        if exchange.waiting is not None:
            if upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.finish(exchange)
                return
            upstream.send(exchange.waiting.head)
            exchange.waiting = None
            self.epoll.modify(upstream.fileno(), select.EPOLLIN)
            return
        data = received(upstream, CHUNK)
        if data is None:
            return
        if not data:
            self.finish(exchange)
            return
        exchange.response_bytes += data
        response = http1_lean.parse_response(exchange.response_bytes, b"GET")
        if response is http1_lean.NEED_MORE:
            return
        if response is None:
            self.finish(exchange)
            return
        end = response.size + response.body_length
        if len(exchange.response_bytes) < end:
            return  # the sketch waits for a small body whole
        exchange.client.sendmsg([response.head, exchange.response_bytes[response.size : end]])
        exchange.flow.bytes_from_upstream += end
        exchange.request.status = response.status
        self.metrics.request_finished(exchange.request)
        exchange.flow.requests += 1
        self.finish(exchange)

    def finish(self, exchange: Exchange) -> None:
        for sock, table in ((exchange.client, self.clients), (exchange.upstream, self.upstreams)):
            if sock is None:
                continue
            if table.pop(sock.fileno(), None) is not None:
                self.epoll.unregister(sock.fileno())
            if sock is exchange.upstream:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
            sock.close()
        exchange.upstream = None
        self.metrics.connection_closed(exchange.flow)


def received(sock: socket.socket, size: int) -> bytes | None:
    """What sock has: b"" at its end or an error, None when nothing came yet."""
    try:
        return sock.recv(size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--listen", type=address, required=True)
    parser.add_argument("--admin", type=address, required=True)
    args = parser.parse_args()
    Sketch(args.listen, args.admin, args.policy).run()


if __name__ == "__main__":
    main()
