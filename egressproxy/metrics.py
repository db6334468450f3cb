"""Metric families on an injected registry: Linkerd's route metrics, and what an operator needs.

Families are created once; label children are cached per route identity (the
frozen ParentRef/RouteRef of the Decision, never re-derived). A finished request
goes further: every child it touches is bound once per (decision, hostname,
status, error), so accounting a request is one dict lookup and the increments.
Model: linkerd2-proxy's `register(reg)` then `metrics(labels)`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from egressproxy.errors import DNS_ERROR, FORBIDDEN
from egressproxy.policy.decision import (
    GRPC_PROTOCOL,
    Action,
    Decision,
    ParentRef,
    RouteProtocol,
    RouteRef,
    is_ip_literal,
)
from egressproxy.records import FlowRecord, RequestRecord

# Linkerd's proxies expose no `_created` series; a scrape that is compared with
# theirs sample by sample must not carry extra families either.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

PARENT_LABELS = (
    "parent_group",
    "parent_kind",
    "parent_namespace",
    "parent_name",
    "parent_port",
    "parent_section_name",
)
ROUTE_LABELS = ("route_group", "route_kind", "route_namespace", "route_name")
ROUTE_IDENTITY = PARENT_LABELS + ROUTE_LABELS
PARENT_PORT = PARENT_LABELS.index("parent_port")

ROUTE_DURATION_BUCKETS = (0.05, 0.5, 1.0, 10.0)
"""Linkerd's outbound route request-duration buckets."""
CONNECTION_DURATION_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 3600.0)

OTHER = "other"
MAX_PARENT_PORTS = 256
"""Distinct parent_port values kept (a network's routes are per destination port): one
port scan must not make a series per port of every route it touches."""
MAX_TARGETS = 1000
"""Distinct (target_ip, target_port) pairs of TCP routes kept, as --max-hostnames keeps
hostnames: the rest are counted as ("other", "other")."""

GRPC_STATUS_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)

ORIGINAL_DST_FAILED = "original_dst_failed"
LOOP = "loop"

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

RouteKey = tuple[ParentRef | None, RouteRef | None]

KEPT_HOSTNAMES = "kept-hostnames"
KEPT_PARENT_PORTS = "kept-parent-ports"
KEPT_TARGETS = "kept-targets"
"""Files of KeptValues in the metrics directory (prometheus-client sums only its *.db)."""

MAX_BOUND_KINDS = 4096
"""Bound children kept per kind of request or connection; more (hostile Host headers,
decisions of many reloads) start the cache afresh rather than grow it without end."""


def grpc_status_name(code: int | None) -> str:
    """The code's name as Linkerd writes it: UNKNOWN when no status came back (a call reset
    or cut before its trailers) or the code is none of gRPC's, as tonic reads it."""
    if code is None or not 0 <= code < len(GRPC_STATUS_NAMES):
        return "UNKNOWN"
    return GRPC_STATUS_NAMES[code]


def route_identity(parent: ParentRef | None, route: RouteRef | None) -> tuple[str, ...]:
    """The ten parent and route label values, all "" when a part is absent.
    parent_section_name is always "": Linkerd's policy controller gives an EgressNetwork
    parent no section, whatever a route's parentRef says."""
    parent_values = (
        (parent.group, parent.kind, parent.namespace, parent.name, parent.port, "")
        if parent is not None
        else ("",) * len(PARENT_LABELS)
    )
    route_values = (
        (route.group, route.kind, route.namespace, route.name)
        if route is not None
        else ("",) * len(ROUTE_LABELS)
    )
    return parent_values + route_values


LabelValue = TypeVar("LabelValue", str, tuple[str, str])


class KeptValues:
    """The values a cap has kept, shared by the workers of a run through a file in its
    metrics directory: one JSON value a line, appended under an exclusive flock.

    The workers' samples are summed into one scrape, so the cap must hold for the sum,
    not for each worker: a value is kept when the file, read up to its end under the
    lock, holds it or has room for it. Each worker opens the file itself after the fork,
    since the workers would share the lock of one inherited open file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.descriptor = -1
        self.opened_by = 0
        self.read_up_to = 0

    def keep(self, value: str | tuple[str, str], kept: set[Any], limit: int) -> bool:
        """Add to `kept` what the other workers kept since the last call, then `value`
        if there is room; whether `value` is kept."""
        if self.opened_by != os.getpid():
            self.descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            self.opened_by, self.read_up_to = os.getpid(), 0
        fcntl.flock(self.descriptor, fcntl.LOCK_EX)
        try:
            end = os.fstat(self.descriptor).st_size
            written = os.pread(self.descriptor, end - self.read_up_to, self.read_up_to)
            self.read_up_to = end
            for line in written.splitlines():
                known = json.loads(line)
                kept.add(tuple(known) if isinstance(known, list) else known)
            if value in kept:
                return True
            if len(kept) >= limit:
                return False
            line = json.dumps(value).encode() + b"\n"
            os.write(self.descriptor, line)
            self.read_up_to += len(line)
            kept.add(value)
            return True
        finally:
            fcntl.flock(self.descriptor, fcntl.LOCK_UN)


class CappedLabels(Generic[LabelValue]):
    """Caps the distinct values of a label (or a pair of them) a scrape shows: the first
    `limit` keep theirs, the rest are `other`. With --workers N the workers keep their
    values in `shared`, so the cap holds for the sum a scrape shows.
    """

    def __init__(self, limit: int, other: LabelValue, shared: KeptValues | None = None) -> None:
        self.limit = limit
        self.other: LabelValue = other
        self.kept: set[LabelValue] = set()
        self.shared = shared

    def __call__(self, value: LabelValue) -> LabelValue:
        if value in self.kept:
            return value
        if len(self.kept) >= self.limit:  # kept values stay kept: every new one is other
            return self.other
        if self.shared is None:
            self.kept.add(value)
            return value
        return value if self.shared.keep(value, self.kept, self.limit) else self.other


class HostnameLabels(CappedLabels[str]):
    """The capped `hostname` label: empty when there is no name, for an IP literal, and
    for every name when the limit is 0 (the label off)."""

    def __init__(self, limit: int, shared: KeptValues | None = None) -> None:
        super().__init__(limit, OTHER, shared)

    def __call__(self, hostname: str | None) -> str:
        if not hostname or self.limit == 0:
            return ""
        if hostname in self.kept:
            return hostname
        if is_ip_literal(hostname):
            return ""
        return super().__call__(hostname)


Family = TypeVar("Family", Counter, Histogram)


class _RouteChildren(Generic[Family]):
    """Children of a family whose labels start with the route identity, cached by route refs."""

    def __init__(self, family: Family, identity: Callable[[RouteKey], tuple[str, ...]]) -> None:
        self.family: Family = family
        self.identity = identity
        self.cache: dict[tuple[RouteKey, tuple[str, ...]], Family] = {}

    def __call__(self, route: RouteKey, *extra: str) -> Family:
        key = (route, extra)
        child = self.cache.get(key)
        if child is None:
            if len(self.cache) >= MAX_BOUND_KINDS:  # the family keeps its children
                self.cache.clear()
            child = self.cache[key] = self._made(route, extra)
        return child

    def _made(self, route: RouteKey, extra: tuple[str, ...]) -> Family:
        return self.family.labels(*self.identity(route), *extra)


class _OpenChildren(_RouteChildren[Counter]):
    """A route's counters of opened connections, which bring its counters of connections
    closed without error and closed as forbidden into being at zero, as Linkerd's proxy
    does with its error kinds when it builds a route: a series that exists before its
    first increment lets Prometheus's increase() and rate() see that increment."""

    def __init__(
        self,
        family: Counter,
        identity: Callable[[RouteKey], tuple[str, ...]],
        closes: _RouteChildren[Counter],
    ) -> None:
        super().__init__(family, identity)
        self.closes = closes

    def _made(self, route: RouteKey, extra: tuple[str, ...]) -> Counter:
        for error in PRECREATED_CLOSE_ERRORS:
            self.closes(route, *extra, error)
        return super()._made(route, extra)


PRECREATED_CLOSE_ERRORS = ("", FORBIDDEN)


class _Children(Generic[Family]):
    """Children of a family with a few plain labels, cached by their values."""

    def __init__(self, family: Family) -> None:
        self.family: Family = family
        self.cache: dict[tuple[str, ...], Family] = {}

    def __call__(self, *label_values: str) -> Family:
        child = self.cache.get(label_values)
        if child is None:
            child = self.cache[label_values] = self.family.labels(*label_values)
        return child


class Value(Protocol):
    """A child's value cell: LoopValue, or prometheus-client's (multiprocess) value class."""

    def inc(self, amount: float) -> None: ...


def value_cell(child: Counter | Gauge) -> Value:
    """The value cell of a counter or gauge child with all its labels, to be changed directly.

    Counter.inc checks on every call that the child is not a parent still missing labels
    and that the amount is not negative: three Python calls around the one increment
    (Gauge.inc and dec the first check). The children bound here have every label, and the
    data plane counts requests, bytes and connections, never a negative amount on a
    counter, so the accounting of every connection and request skips the checks (tested
    against the public API in tests/unit/test_metrics.py)."""
    value: Value = child._value
    return value


class Durations:
    """A histogram child's sum and buckets, observed directly (as value_cell, for the
    same reason). bisect finds the bucket Histogram.observe finds by walking its bounds:
    the first upper bound not below the amount (the last is +Inf)."""

    __slots__ = ("bounds", "buckets", "sum")

    def __init__(self, child: Histogram) -> None:
        self.bounds: list[float] = child._upper_bounds
        self.buckets: list[Value] = child._buckets
        self.sum: Value = child._sum

    def observe(self, amount: float) -> None:
        self.sum.inc(amount)
        self.buckets[bisect_left(self.bounds, amount)].inc(1)


class _RouteMeters:
    """The values of a decision's route that do not depend on hostname or outcome.

    Keyed by id(decision) in a cache: holding the decision keeps that id its own.
    Each child is made on first use, so a route shows only the series it has.
    """

    __slots__ = ("_connection_duration", "_metrics", "_received", "_sent", "decision", "route")

    def __init__(self, metrics: Metrics, decision: Decision | None) -> None:
        self._metrics = metrics
        self.decision = decision
        self.route: RouteKey = (
            (None, None) if decision is None else (decision.parent, decision.route)
        )
        self._connection_duration: Durations | None = None
        self._sent: Value | None = None
        self._received: Value | None = None

    def connection_ended(self, duration: float) -> None:
        if self._connection_duration is None:
            self._connection_duration = Durations(self._metrics.connection_duration(self.route))
        self._connection_duration.observe(duration)

    def count_bytes(self, sent: int, received: int) -> None:
        if sent:
            if self._sent is None:
                self._sent = value_cell(self._metrics.sent_bytes(self.route))
            self._sent.inc(sent)
        if received:
            if self._received is None:
                self._received = value_cell(self._metrics.received_bytes(self.route))
            self._received.inc(received)


class _RequestMeters:
    """The values one kind of finished request touches: (decision, hostname, status, error)."""

    __slots__ = ("duration", "route", "statuses", "would_deny")

    def __init__(self, metrics: Metrics, record: RequestRecord) -> None:
        decision = record.decision
        self.route = metrics.route_meters(decision)
        self.statuses: Value | None = None
        self.duration: Durations | None = None
        self.would_deny: Value | None = None
        if decision.parent is None:
            return
        route: RouteKey = (decision.parent, decision.route)
        hostname = metrics.hostname(record.hostname)
        if decision.protocol is RouteProtocol.GRPC:
            status = grpc_status_name(record.grpc_status)
            statuses = metrics.grpc_statuses(route, hostname, status, record.error)
            duration = metrics.grpc_duration(route, hostname)
        else:
            status = "" if record.status is None else str(record.status)
            statuses = metrics.http_statuses(route, hostname, status, record.error)
            duration = metrics.http_duration(route, hostname)
        self.statuses, self.duration = value_cell(statuses), Durations(duration)
        if _would_deny(decision):
            self.would_deny = value_cell(metrics.audit_would_deny(route, hostname))


class Metrics:
    """What the data plane reports (through server.Reporting), turned into metric samples."""

    def __init__(
        self, registry: CollectorRegistry, *, max_hostnames: int, shared: str | None = None
    ) -> None:
        """`shared`: the metrics directory the workers of a run write to (keep_values)."""

        def kept(name: str) -> KeptValues | None:
            return None if shared is None else KeptValues(os.path.join(shared, name))

        self.hostname = HostnameLabels(max_hostnames, kept(KEPT_HOSTNAMES))
        self.parent_port = CappedLabels(MAX_PARENT_PORTS, OTHER, kept(KEPT_PARENT_PORTS))
        self.target = CappedLabels(MAX_TARGETS, (OTHER, OTHER), kept(KEPT_TARGETS))
        self._identities: dict[RouteKey, tuple[str, ...]] = {}
        self._route_meters: dict[int, _RouteMeters] = {}
        self._request_meters: dict[tuple[int, str | None, int | None, str], _RequestMeters] = {}

        def counter(name: str, help_text: str, labels: tuple[str, ...]) -> _RouteChildren[Counter]:
            family = Counter(name, help_text, (*ROUTE_IDENTITY, *labels), registry=registry)
            return _RouteChildren(family, self._identity)

        def histogram(
            name: str, help_text: str, labels: tuple[str, ...], buckets: tuple[float, ...]
        ) -> _RouteChildren[Histogram]:
            family = Histogram(
                name, help_text, (*ROUTE_IDENTITY, *labels), registry=registry, buckets=buckets
            )
            return _RouteChildren(family, self._identity)

        def opened(
            name: str, help_text: str, labels: tuple[str, ...], closes: _RouteChildren[Counter]
        ) -> _OpenChildren:
            family = Counter(name, help_text, (*ROUTE_IDENTITY, *labels), registry=registry)
            return _OpenChildren(family, self._identity, closes)

        def plain(name: str, help_text: str, labels: tuple[str, ...]) -> _Children[Counter]:
            return _Children(Counter(name, help_text, labels, registry=registry))

        self.http_statuses = counter(
            "outbound_http_route_request_statuses_total",
            "HTTP requests by route and outcome",
            ("hostname", "http_status", "error"),
        )
        self.grpc_statuses = counter(
            "outbound_grpc_route_request_statuses_total",
            "gRPC calls by route and outcome",
            ("hostname", "grpc_status", "error"),
        )
        self.http_duration = histogram(
            "outbound_http_route_request_duration_seconds",
            "HTTP request durations by route",
            ("hostname",),
            ROUTE_DURATION_BUCKETS,
        )
        self.grpc_duration = histogram(
            "outbound_grpc_route_request_duration_seconds",
            "gRPC call durations by route",
            ("hostname",),
            ROUTE_DURATION_BUCKETS,
        )
        self.tls_close = counter(
            "outbound_tls_route_close_total",
            "TLS connections closed by route and outcome",
            ("hostname", "error"),
        )
        self.tls_open = opened(
            "outbound_tls_route_open_total",
            "TLS connections opened by route",
            ("hostname",),
            self.tls_close,
        )
        self.tcp_close = counter(
            "outbound_tcp_route_close_total",
            "TCP connections closed by route and outcome",
            ("target_ip", "target_port", "error"),
        )
        self.tcp_open = opened(
            "outbound_tcp_route_open_total",
            "TCP connections opened by route",
            ("target_ip", "target_port"),
            self.tcp_close,
        )
        self.audit_would_deny = counter(
            "egress_audit_would_deny_total",
            "Connections and requests an audited policy would have denied (they passed)",
            ("hostname",),
        )
        self.connection_duration = histogram(
            "egress_connection_duration_seconds",
            "Client connection lifetimes by the route decided for the connection",
            (),
            CONNECTION_DURATION_BUCKETS,
        )
        self.sent_bytes = counter(
            "egress_sent_bytes_total",
            "Bytes from clients towards upstreams, by route: all of a TLS or TCP route's,"
            " the message bodies (and Upgrade or CONNECT tunnels) of an HTTP or gRPC route's",
            (),
        )
        self.received_bytes = counter(
            "egress_received_bytes_total",
            "Bytes from upstreams towards clients, by route: all of a TLS or TCP route's,"
            " the message bodies (and Upgrade or CONNECT tunnels) of an HTTP or gRPC route's",
            (),
        )
        self.destination_mismatch = plain(
            "egress_destination_mismatch_total",
            "Hostnames whose addresses do not include the original destination",
            ("hostname", "mode"),
        )
        self.destination_unverified = plain(
            "egress_destination_unverified_total",
            "Hostnames the resolver gave no answer for, so the original destination went unchecked",
            ("hostname", "mode"),
        )
        self.sniff_outcomes = plain(
            "egress_sniff_outcomes_total",
            "What protocol detection found on new connections (or why it gave up)",
            ("outcome",),
        )
        self.encrypted_client_hellos = Counter(
            "egress_encrypted_client_hellos_total",
            "ClientHellos carrying Encrypted Client Hello (decided on their outer SNI, or denied)",
            registry=registry,
        )
        self.connect_errors = plain(
            "egress_upstream_connect_errors_total",
            "Upstream connections that could not be opened, by cause",
            ("error",),
        )
        self.policy_reloads = plain(
            "egress_policy_reloads_total", "Policy reloads by result", ("result",)
        )
        for result in ("ok", "error"):
            # At 0 from the start: an alert on increase(...{result="error"}) misses a
            # first failed reload whose series only appears at 1.
            self.policy_reloads(result)
        self.policy_generation = Gauge(
            "egress_policy_generation",
            "Generation of the policy in force (1 for the first one loaded); with --workers,"
            " the lowest any worker has in force",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.open_connections = Gauge(
            "egress_open_connections",
            "Client connections open now",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._open_connections = value_cell(self.open_connections)
        self._sniff_outcomes: dict[str, Value] = {}
        """Value cells by outcome: the few words of the sniffer, bound once each."""
        self.tasks = Gauge(
            "egress_event_loop_tasks",
            "Asyncio tasks alive in the event loops (rising while connections do not: a leak)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.original_destination_failures = Counter(
            "egress_original_destination_failures_total",
            "Connections whose original destination could not be read (not redirected?)",
            registry=registry,
        )
        self.loops = Counter(
            "egress_redirect_loops_total",
            "Connections addressed to the proxy itself (its own traffic redirected back?)",
            registry=registry,
        )

    def _identity(self, route: RouteKey) -> tuple[str, ...]:
        identity = self._identities.get(route)
        if identity is None:
            if len(self._identities) >= MAX_BOUND_KINDS:
                self._identities.clear()
            identity = route_identity(*route)
            if identity[PARENT_PORT]:
                port = self.parent_port(identity[PARENT_PORT])
                identity = (*identity[:PARENT_PORT], port, *identity[PARENT_PORT + 1 :])
            self._identities[route] = identity
        return identity

    def connection_opened(self) -> None:
        self._open_connections.inc(1)

    def connection_decided(self, record: FlowRecord) -> None:
        outcome = self._sniff_outcomes.get(record.sniff_outcome)
        if outcome is None:
            outcome = self._sniff_outcomes[record.sniff_outcome] = value_cell(
                self.sniff_outcomes(record.sniff_outcome)
            )
        outcome.inc(1)
        if record.ech:
            self.encrypted_client_hellos.inc()
        decision = record.decision
        if decision is None or decision.protocol in PER_REQUEST:
            return
        route: RouteKey = (decision.parent, decision.route)
        if _would_deny(decision):  # traffic no network covers too: --ech deny under --audit
            self.audit_would_deny(route, self.hostname(record.hostname)).inc()
        if decision.parent is None:
            return
        if decision.protocol is RouteProtocol.TLS:
            self.tls_open(route, self.hostname(record.hostname)).inc()
        else:
            self.tcp_open(route, *self.target(_target(record))).inc()

    def connection_closed(self, record: FlowRecord) -> None:
        self._open_connections.inc(-1)
        self._count_error(record.error)
        decision = record.decision
        meters = self.route_meters(decision)
        meters.connection_ended(time.monotonic() - record.started)
        if decision is None or decision.protocol not in PER_REQUEST:
            meters.count_bytes(record.bytes_from_client, record.bytes_from_upstream)
        if decision is None or decision.parent is None:
            return
        route: RouteKey = (decision.parent, decision.route)
        if decision.protocol is RouteProtocol.TLS:
            self.tls_close(route, self.hostname(record.hostname), record.error).inc()
        elif decision.protocol is RouteProtocol.TCP:
            self.tcp_close(route, *self.target(_target(record)), record.error).inc()

    def request_finished(self, record: RequestRecord) -> None:
        decision = record.decision
        status = record.grpc_status if decision.protocol is GRPC_PROTOCOL else record.status
        key = (id(decision), record.hostname, status, record.error)
        meters = self._request_meters.get(key)
        if meters is None:
            if len(self._request_meters) >= MAX_BOUND_KINDS:
                self._request_meters.clear()
            meters = self._request_meters[key] = _RequestMeters(self, record)
        if record.error:
            self._count_error(record.error)
        meters.route.count_bytes(record.bytes_from_client, record.bytes_from_upstream)
        if meters.statuses is not None and meters.duration is not None:
            meters.statuses.inc(1)
            meters.duration.observe(time.monotonic() - record.started)
        if meters.would_deny is not None:
            meters.would_deny.inc(1)

    def route_meters(self, decision: Decision | None) -> _RouteMeters:
        meters = self._route_meters.get(id(decision))
        if meters is None:
            if len(self._route_meters) >= MAX_BOUND_KINDS:
                self._route_meters.clear()
            meters = self._route_meters[id(decision)] = _RouteMeters(self, decision)
        return meters

    def policy_reloaded(self, ok: bool, generation: int) -> None:
        self.policy_reloads("ok" if ok else "error").inc()
        if ok:
            self.policy_generation.set(generation)

    def policy_loaded(self, generation: int) -> None:
        """The first policy is in force (not a reload: nothing is counted)."""
        self.policy_generation.set(generation)

    def _count_error(self, error: str) -> None:
        if error == ORIGINAL_DST_FAILED:
            self.original_destination_failures.inc()
        elif error == LOOP:
            self.loops.inc()

    def upstream_failed(self, error: str) -> None:
        self.connect_errors(error).inc()

    def destination_unconfirmed(self, error: str, hostname: str, mode: str, times: int) -> None:
        unverified = error == DNS_ERROR  # no answer: not shown to be elsewhere
        counter = self.destination_unverified if unverified else self.destination_mismatch
        counter(self.hostname(hostname), mode).inc(times)


PER_REQUEST = frozenset({RouteProtocol.HTTP, RouteProtocol.GRPC})
"""Connections whose traffic the HTTP handlers account request by request."""


def _would_deny(decision: Decision) -> bool:
    return decision.audit and decision.action is Action.DENY


def _target(record: FlowRecord) -> tuple[str, str]:
    if record.destination is None:
        return "", ""
    return record.destination.host, str(record.destination.port)


class LoopValue:
    """A metric value changed by one thread only: the event loop's (the data plane, the
    admin server and the timers all run there; the lookup, log-writer and policy-read
    threads hand their results to the loop). A scrape reads it from the admin's answer
    thread, and a read sees the float before or after a change, never half of one.
    prometheus-client's own single-process value takes a lock for every change, a third of
    what an increment costs, and a request makes five of them."""

    __slots__ = ("_exemplar", "_value")

    def __init__(self, *_: object, **__: object) -> None:
        self._value = 0.0
        self._exemplar: object = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: object) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> object:
        return self._exemplar


METRICS_DIRECTORY_PREFIX = "egressproxy-metrics-"
STARTING_DIRECTORY_PREFIX = "egressproxy-starting-"
"""A run's metrics directory until its lock is held: another run starting at the same time
must not find it unlocked and take it for a dead run's."""
OWNER_LOCK = "owner.lock"
"""A file in each run's metrics directory that the run's processes hold locked (flock) for
as long as one of them lives: a directory whose lock can be taken is a dead run's."""
_owner_lock: int | None = None
"""The supervisor's descriptor of its lock file, open for its whole life (the forked
workers hold it too)."""


STALE_STARTING_SECONDS = 60.0
"""A run is in its starting directory for a few system calls: one older than this was
left by a run killed (or failed) right then."""


def _remove_dead_runs(parent: str) -> None:
    """Remove the metrics directories that runs killed before their cleanup (SIGKILL, an
    OOM kill) left in parent: only ours (the prefix, our uid's, a lock file) whose lock is
    free, and starting directories of ours left long ago. Their files are never summed
    in: each run reads only its own directory."""
    for candidate in Path(parent).glob(STARTING_DIRECTORY_PREFIX + "*"):
        with contextlib.suppress(OSError):
            status = candidate.lstat()
            if (
                status.st_uid == os.getuid()
                and time.time() - status.st_mtime > STALE_STARTING_SECONDS
            ):
                shutil.rmtree(candidate, ignore_errors=True)
    for candidate in Path(parent).glob(METRICS_DIRECTORY_PREFIX + "*"):
        try:
            if candidate.lstat().st_uid != os.getuid():
                continue
            descriptor = os.open(candidate / OWNER_LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # not a directory of ours, or not ours to remove
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            continue  # a live run's
        shutil.rmtree(candidate, ignore_errors=True)
        os.close(descriptor)


def keep_values(workers: int) -> str | None:
    """Where metric values live from now on: in this process (one worker, None), or in
    mmapped files under a fresh directory of this run's own (returned, to be removed at exit).

    prometheus-client picks its value class when it is imported, from the environment
    (PROMETHEUS_MULTIPROC_DIR); --workers is only known later, so the choice is made again
    here, before any family is created. For --workers N the directory is made inside
    PROMETHEUS_MULTIPROC_DIR when that is set (a writable volume beside a read-only root),
    else in the temporary directory: files already there, another run's or program's, are
    never summed in nor removed, except the directories of runs killed before they could
    remove their own (_remove_dead_runs). Forked workers write their own files; one scrape
    of the directory sums them. OSError, saying where, when the directory cannot be made.
    """
    parent = os.environ.pop(MULTIPROCESS_ENV, "")
    if workers == 1:
        values.ValueClass = LoopValue
        return None
    global _owner_lock
    starting = ""
    try:
        starting = tempfile.mkdtemp(prefix=STARTING_DIRECTORY_PREFIX, dir=parent or None)
        _owner_lock = os.open(Path(starting) / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(_owner_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        name = (
            METRICS_DIRECTORY_PREFIX + os.path.basename(starting)[len(STARTING_DIRECTORY_PREFIX) :]
        )
        directory = os.path.join(os.path.dirname(starting), name)
        os.rename(starting, directory)  # locked before the other runs' clean-up can see it
    except OSError as error:
        if starting:
            shutil.rmtree(starting, ignore_errors=True)
        # Without one usable, tempfile.gettempdir() itself raises: name the search instead.
        where = f"{MULTIPROCESS_ENV}={parent}" if parent else "TMPDIR, /tmp, /var/tmp or /usr/tmp"
        reason = error.strerror or str(error)
        raise OSError(f"cannot make the metrics directory in {where}: {reason}") from None
    _remove_dead_runs(os.path.dirname(directory))
    os.environ[MULTIPROCESS_ENV] = directory
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return directory


def forget_worker(pid: int) -> None:
    """A worker is gone: its live gauges (open connections) no longer count."""
    mark_process_dead(pid)  # type: ignore[no-untyped-call]


def multiprocess_registry(directory: str) -> CollectorRegistry:
    """A registry whose collection is the sum over every process writing to `directory`."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The scrape body and its content type: OpenMetrics when the Accept header asks for it."""
    encode, content_type = choose_encoder(_openmetrics_asked(accept))
    return encode(registry), content_type


OPENMETRICS_TYPE = "application/openmetrics-text"
TEXT_TYPES = frozenset({"text/plain", "text/*", "*/*"})


def _openmetrics_asked(accept: str) -> str:
    """The OpenMetrics media range to answer in, or "" for the text format: the one weighed
    highest of those it can be made in (q > 0; no version, or 1.0.0 and later), when weighed
    no lower than the text format.

    choose_encoder alone takes the first one named, even at q=0 or below a preferred
    text/plain (a scraper told to prefer the text format says so with q), and fails on a
    version that is not numbers (`version=abc`: a 500 for a scrape).
    """
    best_text, best_weight, best_range = 0.0, 0.0, ""
    for media_range in accept.split(","):
        media_type, *parameters = (part.strip() for part in media_range.split(";"))
        media_type = media_type.lower()
        weight, version, kept = 1.0, "", [OPENMETRICS_TYPE]
        for parameter in parameters:
            name, _, value = (part.strip() for part in parameter.partition("="))
            name, value = name.lower(), _unquoted(value)
            if name == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
            elif name in ("version", "escaping"):
                kept.append(f"{name}={value}")
                if name == "version":
                    version = value
        if media_type in TEXT_TYPES:
            best_text = max(best_text, weight)
        elif media_type == OPENMETRICS_TYPE and weight > best_weight and _made(version):
            best_weight, best_range = weight, ";".join(kept)
    return best_range if best_weight >= best_text else ""


def _unquoted(value: str) -> str:
    """A media-type parameter's value as a token or a quoted-string (RFC 9110 5.6.6:
    `version="1.0.0"` is `version=1.0.0`)."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _made(version: str) -> bool:
    """An OpenMetrics version prometheus-client makes: none named, or numbers from 1.0.0."""
    if not version:
        return True
    numbers = version.split(".")
    return all(number.isdigit() for number in numbers) and tuple(map(int, numbers)) >= (1, 0, 0)
