"""The model compiled once into lookup tables, so a decision costs O(labels), not O(rules).

Networks sit in a CIDR table keyed by prefix length (at most 33 or 129 dict
probes, longest first). Each network has a table per port; each port
holds routes by family in host tables: an exact-host dict, a reversed-label
wildcard trie (most specific suffix first) and the routes without hostnames.
Only the routes at the best hostname level are evaluated against a request.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import ipaddress
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, NamedTuple, TypeVar
from urllib.parse import parse_qsl, unquote

from egressproxy.policy.decision import (
    DENY_ACTION,
    GRPC_PROTOCOL,
    HTTP_PROTOCOL,
    TCP_PROTOCOL,
    TLS_PROTOCOL,
    Action,
    Backend,
    ConnectionFacts,
    Decision,
    Destination,
    Detected,
    IPAddress,
    ParentRef,
    RequestFacts,
    RouteProtocol,
    RouteRef,
)
from egressproxy.policy.model import (
    AUTHORITY,
    Attachment,
    CidrRange,
    ClientRef,
    GrpcMatch,
    HostBackend,
    HttpMatch,
    MatchKind,
    Model,
    Network,
    NetworkId,
    Origin,
    Route,
    Rule,
    ServiceBackend,
    TrafficPolicy,
    ValueMatch,
    within,
)
from egressproxy.policy.regex import Pattern
from egressproxy.settings import IPNetwork, Settings

log = logging.getLogger(__name__)
OLDEST = datetime.min.replace(tzinfo=UTC)
NO_FILTER_CHAIN = "no Egress filter chain matched"
T = TypeVar("T")


def age_key(
    created: datetime | None, order: int, namespace: str, name: str, rank: int = 0
) -> tuple[object, ...]:
    """Oldest first: creationTimestamp when given (then namespace/name), else document
    order, then the place within the document (rank: a native policy's rules)."""
    return (created or OLDEST, 0 if created else order, rank, namespace, name)


def route_age(route: Route) -> tuple[object, ...]:
    """Oldest first, as Linkerd's policy controller orders a port's routes: one with a
    creationTimestamp before one without, the older first, then by name (then namespace,
    where Linkerd leaves the order to a hash map); those without one as age_key has it."""
    if route.created is None:
        return (1, *age_key(None, route.order, route.ref.namespace, route.ref.name, route.rank))
    return (0, route.created, 0, route.rank, route.ref.name, route.ref.namespace)


MAX_MEMOISED_LEVELS = 4096
"""Hostnames whose candidate levels a HostTable remembers (hostile Host headers included)."""


class HostTable(Generic[T]):
    """Items keyed by hostname pattern: exact names, `*.suffix` wildcards, and no hostname."""

    def __init__(self) -> None:
        self.exact: dict[str, list[T]] = {}
        self.wildcards: dict[str, WildcardNode[T]] = {}
        self.any: list[T] = []
        self._levels: dict[str | None, tuple[list[T], ...]] = {}

    def add(self, hostnames: Sequence[str], item: T) -> None:
        self._levels.clear()
        if not hostnames:
            self.any.append(item)
        for hostname in hostnames:
            if hostname.startswith("*."):
                labels = reversed(hostname[2:].split("."))
                children = self.wildcards
                node: WildcardNode[T] | None = None
                for label in labels:
                    node = children.setdefault(label, WildcardNode())
                    children = node.children
                assert node is not None
                node.items.append(item)
            else:
                self.exact.setdefault(hostname, []).append(item)

    def __bool__(self) -> bool:
        return bool(self.exact or self.wildcards or self.any)

    def entries(self) -> Iterator[tuple[str | None, T]]:
        """Every (hostname pattern, item) added, None for the items of no hostname."""
        for item in self.any:
            yield None, item
        for hostname, items in self.exact.items():
            for item in items:
                yield hostname, item
        pending = list(self.wildcards.items())
        while pending:
            suffix, node = pending.pop()
            for item in node.items:
                yield f"*.{suffix}", item
            pending.extend((f"{label}.{suffix}", child) for label, child in node.children.items())

    def sort(self, key: Callable[[T], tuple[object, ...]]) -> None:
        self.any.sort(key=key)
        for items in self.exact.values():
            items.sort(key=key)
        pending = list(self.wildcards.values())
        while pending:
            node = pending.pop()
            node.items.sort(key=key)
            pending.extend(node.children.values())

    def levels(self, hostname: str | None) -> tuple[list[T], ...]:
        """Candidate lists, most specific first: exact, longest wildcard suffix …, no hostname.

        Remembered per hostname (a connection's requests mostly share one), at most
        MAX_MEMOISED_LEVELS names, forgotten all at once when full.
        """
        levels = self._levels.get(hostname)
        if levels is None:
            if len(self._levels) >= MAX_MEMOISED_LEVELS:
                self._levels.clear()
            levels = self._levels[hostname] = tuple(self._find_levels(hostname))
        return levels

    def _find_levels(self, hostname: str | None) -> Iterator[list[T]]:
        if hostname:
            exact = self.exact.get(hostname)
            if exact:
                yield exact
            labels = hostname.split(".")
            matched: list[list[T]] = []
            children = self.wildcards
            for label in reversed(labels[1:]):
                node = children.get(label)
                if node is None:
                    break
                if node.items:
                    matched.append(node.items)
                children = node.children
            yield from reversed(matched)
        if self.any:
            yield self.any


@dataclass
class WildcardNode(Generic[T]):
    children: dict[str, WildcardNode[T]] = field(default_factory=dict)
    items: list[T] = field(default_factory=list)


@dataclass(frozen=True)
class CompiledRule:
    position: tuple[object, ...]
    """Route age, then rule order: the tie-break between equally specific matches."""
    rule: Rule
    route: Route
    http: tuple[CompiledHttpMatch, ...]
    grpc: tuple[CompiledGrpcMatch, ...]
    backend: Backend | None

    def covers(self, address: IPAddress) -> bool:
        return not self.rule.cidrs or any(address in cidr for cidr in self.rule.cidrs)

    def describe(self) -> str:
        route = f"{self.route.ref.kind} {route_name(self.route.ref)}"
        return f"{route} rule {self.rule.name} ({self.rule.origin})"


def route_name(ref: RouteRef) -> str:
    return f"{ref.namespace}/{ref.name}" if ref.namespace else ref.name


def wire_text(text: str, errors: str = "surrogatepass") -> str:
    """A policy's value as requests carry it: its UTF-8 bytes, one character per byte.

    The HTTP layers decode what they read as latin-1, so a request's path, query and
    header values are their bytes; a value written in the policy (`/café`, a header
    value) is text, and compares with them once in this form, as Linkerd compares a
    header's bytes with the UTF-8 of its match. errors: surrogatepass for the policy,
    where a YAML escape can write a lone surrogate (its bytes match nothing a request
    sends); surrogateescape for a command line's text, whose undecodable bytes come back
    as they were."""
    return text if text.isascii() else text.encode(errors=errors).decode("latin-1")


class CompiledValueMatch:
    def __init__(self, match: ValueMatch) -> None:
        self.name = wire_text(match.name)  # a query parameter's name may be text too
        self.exact = wire_text(match.value) if match.kind == MatchKind.EXACT else None
        self.pattern = Pattern(match.value) if match.kind == MatchKind.REGEX else None
        self.on_authority = match.name == AUTHORITY

    def matches_request(self, request: RequestFacts) -> bool:
        """A header match: `:authority` reads the request's authority as sent, port included,
        however it came (Host, :authority, an absolute target); other names its headers."""
        if self.on_authority:
            authority = request.authority
            return authority is not None and self.matches(((AUTHORITY, authority),))
        return self.matches(request.headers)

    def matches(self, pairs: Sequence[tuple[str, str]]) -> bool:
        for name, value in pairs:
            if name != self.name:
                continue
            if self.exact is not None and value == self.exact:
                return True
            if self.pattern is not None and self.pattern.fullmatch(value):
                return True
        return False


_SLASHES = re.compile(r"/{2,}")


def normalized_path(path: str) -> str:
    """The path as a server resolving it would see it, for matching only (the request goes
    on as it came): percent-escapes decoded (nginx decodes them all, %2F included), slashes
    merged, dot segments removed (RFC 3986 5.2.4). Else `/%61dmin`, `//admin` or
    `/public/../admin` would get past a rule on `/admin`, or into one on `/public`.

    Bytes in, bytes out (one character per byte, see wire_text): `/caf%C3%A9` and the
    same UTF-8 sent raw are one path."""
    if not path.startswith("/") or resolved_as_written(path):
        return path
    return _resolved(unquote(path, encoding="latin-1"))


def resolved_as_written(path: str) -> bool:
    """Nothing to decode, no slashes to merge, no dot segment: resolving changes nothing."""
    return "%" not in path and "//" not in path and "/." not in path


_PARAMETERS = re.compile(r";[^/]*")


def as_some_servers_read(normalized: str) -> str:
    """A normalized path as servers beyond RFC 3986 read it: `;parameters` dropped from
    each segment (Tomcat, Jetty, Spring: `/public/..;/admin` is `/admin` there, `/admin;x`
    is `/admin`) and `\\` as `/` (IIS). Asked only of a path with `;` or `\\` in it once
    decoded, to deny what either reading denies."""
    path = normalized.replace("\\", "/")
    return _resolved(_PARAMETERS.sub("", path)) if path.startswith("/") else path


def with_dot_segments(path: str) -> str | None:
    """A path as servers that route it before resolving it read it (Express, and Linkerd's
    own matching): decoded and its slashes merged, its `.` and `..` segments kept; None
    when it has none. To them `/admin/../public` is under `/admin`."""
    decoded = _SLASHES.sub("/", unquote(path, encoding="latin-1"))
    segments = decoded.split("/")
    return decoded if "." in segments or ".." in segments else None


def _resolved(path: str) -> str:
    """A decoded path with its slashes merged and its dot segments removed."""
    parts = _SLASHES.sub("/", path).split("/")[1:]
    kept: list[str] = []
    for part in parts:
        if part == "..":
            if kept:
                kept.pop()
        elif part != ".":
            kept.append(part)
    if parts[-1] in (".", ".."):
        kept.append("")  # `/a/b/..` is `/a/`
    return "/" + "/".join(kept)


class CompiledHttpMatch:
    """One HTTPRoute match; its score orders matches as Gateway API precedence says: an Exact
    path first, then the most characters matched (a PathPrefix's, or all of the path for a
    RegularExpression, as linkerd2-proxy ranks one), a method, headers, query parameters."""

    def __init__(self, match: HttpMatch) -> None:
        path = match.path
        self.path_kind = path.kind if path else MatchKind.PREFIX
        value = path.value if path else "/"
        if self.path_kind != MatchKind.REGEX:
            value = normalized_path(wire_text(value))  # as requests are: `/a%20b`, `/café`
        self.path_value = value
        self.exact_path = self.path_kind == MatchKind.EXACT
        """Asked for every request: a plain attribute, where an enum member costs a call."""
        self.prefix = value.rstrip("/") if self.path_kind == MatchKind.PREFIX else value
        self.below_prefix = self.prefix + "/"
        """What the paths below a PathPrefix start with, made once: it is asked per request."""
        self.pattern = Pattern(value) if self.path_kind == MatchKind.REGEX else None
        self.method = match.method
        self.method_any_case = match.method_any_case
        self.headers = tuple(CompiledValueMatch(header) for header in match.headers)
        self.query = tuple(CompiledValueMatch(param) for param in match.query)
        self.rest = (self.method is not None, len(self.headers), len(self.query))
        # linkerd2-proxy's lengths: `/foo/` is no longer a prefix than `/foo`, and `/` (also
        # a match without a path) is one character, which ties a RegularExpression on `/`
        length = 1 if self.path_kind == MatchKind.PREFIX and value == "/" else len(self.prefix)
        self.score = (self.exact_path, length, *self.rest)
        """The score of a match on any path; a RegularExpression's is score_for(path)'s."""

    def score_for(self, path: str) -> tuple[object, ...]:
        if self.pattern is None:
            return self.score
        return (False, len(path), *self.rest)

    def matches(self, request: RequestFacts, query: Sequence[tuple[str, str]]) -> bool:
        """Runs for every request: no generator is made for a match without headers or query."""
        if not self.path_matches(request.path):
            return False
        if self.method is not None and self.method != (
            request.method.upper() if self.method_any_case else request.method
        ):
            return False
        if self.headers and not all(header.matches_request(request) for header in self.headers):
            return False
        return not self.query or all(param.matches(query) for param in self.query)

    def path_matches(self, path: str) -> bool:
        if self.exact_path:
            return path == self.path_value
        if self.pattern is not None:
            return self.pattern.fullmatch(path)
        return not self.prefix or path == self.prefix or path.startswith(self.below_prefix)


DEFAULT_HTTP_MATCH = CompiledHttpMatch(HttpMatch())


class CompiledGrpcMatch:
    """One gRPC method match; its score orders matches as Gateway API's GRPCRoute precedence
    (and linkerd2-proxy) does: the most characters of service matched, then of method, then
    header matches; a regular expression (native rules) counts what it matched, and loses a
    tie to exact names."""

    def __init__(self, match: GrpcMatch) -> None:
        self.service = match.service
        self.method = match.method
        self.regex = match.kind == MatchKind.REGEX
        self.service_pattern = Pattern(match.service) if self.regex and match.service else None
        self.method_pattern = Pattern(match.method) if self.regex and match.method else None
        self.headers = tuple(CompiledValueMatch(header) for header in match.headers)
        self.any_method = match.any_method
        self.score = (len(match.service or ""), len(match.method or ""), len(self.headers), True)
        """The score of an exact match; a regular expression's is score_for's."""

    def score_for(self, service: str | None, method: str | None) -> tuple[int, int, int, bool]:
        if not self.regex:
            return self.score
        return (
            len(service or "") if self.service is not None else 0,
            len(method or "") if self.method is not None else 0,
            len(self.headers),
            False,
        )

    def matches(self, service: str | None, method: str | None, request: RequestFacts) -> bool:
        """Linkerd's match takes only a POST of a call, even when it names neither service
        nor method; a native one anything its parts allow, so a deny is not dodged."""
        return (
            (self.any_method or (request.method == "POST" and service is not None))
            and self.part_matches(self.service, self.service_pattern, service)
            and self.part_matches(self.method, self.method_pattern, method)
            and all(header.matches_request(request) for header in self.headers)
        )

    def part_matches(self, wanted: str | None, pattern: Pattern | None, actual: str | None) -> bool:
        if wanted is None:
            return True
        if actual is None:
            return False
        if pattern is not None:
            return pattern.fullmatch(actual)
        return actual == wanted


NOT_A_CALL = "not a gRPC call (POST /service/method)"

DEFAULT_GRPC_MATCH = CompiledGrpcMatch(GrpcMatch(any_method=True))
"""A gRPC rule without matches takes every call, whatever its method."""


class RankedMatch(NamedTuple):
    """One HTTP match of a rule at a hostname level, as RankedLevel orders it."""

    order: int
    """Where a walk over the level's rules (oldest first) and their matches meets it: of
    two matches of one score, the one met first wins."""
    rule: CompiledRule
    match: CompiledHttpMatch
    by_path_alone: bool
    """It takes every request whose path it matches: no method, header, query, address or
    authority of the request counts."""


@dataclass(frozen=True)
class RankedLevel:
    """A hostname level's HTTP matches ordered so that the first one a request fits is the
    one Gateway API precedence picks (best score, then the oldest rule and its first match):
    a request is held against the few matches its path can meet, not against every one."""

    exact: dict[str, tuple[RankedMatch, ...]]
    """Exact path matches by their path, best first; any of them outranks every other."""
    others: tuple[RankedMatch, ...]
    """Prefix matches (a rule without matches is a prefix `/`), best first."""
    patterns: tuple[RankedMatch, ...]
    """RegularExpression matches, whose score depends on the path they match."""
    reads_query: bool
    most_specific_host_only: bool


def rank_level(level: Sequence[CompiledRule]) -> RankedLevel:
    met = ((rule, match) for rule in level for match in rule.http or (DEFAULT_HTTP_MATCH,))
    matches = [
        RankedMatch(
            order,
            rule,
            match,
            not (rule.rule.cidrs or rule.route.port_in_host_must_match or match.method)
            and not (match.headers or match.query),
        )
        for order, (rule, match) in enumerate(met)
    ]
    best_first = sorted(
        (ranked for ranked in matches if ranked.match.pattern is None),
        key=lambda ranked: (ranked.match.score, -ranked.order),
        reverse=True,
    )
    exact: dict[str, list[RankedMatch]] = {}
    for ranked in best_first:
        if ranked.match.exact_path:
            exact.setdefault(ranked.match.path_value, []).append(ranked)
    return RankedLevel(
        exact={path: tuple(ranked) for path, ranked in exact.items()},
        others=tuple(ranked for ranked in best_first if not ranked.match.exact_path),
        patterns=tuple(ranked for ranked in matches if ranked.match.pattern is not None),
        reads_query=any(ranked.match.query for ranked in matches),
        most_specific_host_only=any(rule.route.most_specific_host_only for rule in level),
    )


class HttpRules(HostTable[CompiledRule]):
    """A port's HTTP rules by hostname, each level of them ranked (RankedLevel) once."""

    def __init__(self) -> None:
        super().__init__()
        self._ranked_levels: dict[str | None, tuple[RankedLevel, ...]] = {}
        self._rankings: dict[int, RankedLevel] = {}
        """By id() of the level's list: the table holds each of its lists as long as it
        lives, so no other list takes that id meanwhile."""

    def add(self, hostnames: Sequence[str], item: CompiledRule) -> None:
        super().add(hostnames, item)
        self._ranked_levels.clear()
        self._rankings.clear()

    def sort(self, key: Callable[[CompiledRule], tuple[object, ...]]) -> None:
        super().sort(key)
        self._ranked_levels.clear()
        self._rankings.clear()

    def ranked_levels(self, hostname: str | None) -> tuple[RankedLevel, ...]:
        """levels(hostname) ranked, remembered as levels() remembers them."""
        ranked = self._ranked_levels.get(hostname)
        if ranked is None:
            if len(self._ranked_levels) >= MAX_MEMOISED_LEVELS:
                self._ranked_levels.clear()
            ranked = self._ranked_levels[hostname] = tuple(
                self._ranking(level) for level in self.levels(hostname)
            )
        return ranked

    def _ranking(self, level: list[CompiledRule]) -> RankedLevel:
        ranking = self._rankings.get(id(level))
        if ranking is None:
            ranking = self._rankings[id(level)] = rank_level(level)
        return ranking


@dataclass
class PortTable:
    """The routes of one port of one network, by family."""

    fixed: RouteProtocol | None = None
    http: HttpRules = field(default_factory=HttpRules)
    grpc: HostTable[CompiledRule] = field(default_factory=HostTable)
    tls: HostTable[CompiledRule] = field(default_factory=HostTable)
    tcp: list[CompiledRule] = field(default_factory=list)
    grpc_calls: HostTable[CompiledRule] | None = None
    """Where no Gateway API route fixes the protocol and gRPC rules are: the gRPC rules and
    the HTTP rules together, as a gRPC call is an HTTP request too, so that a rule for its
    host (a deny above all) holds against a gRPC rule for any host. None: the gRPC rules."""
    envoy: bool = False
    """OSM Egress routes are here (Route.envoy_filter_chains): filter_chains decides."""
    http_chain: bool = False
    """An OSM http Egress is here, even one without routes (hosts or matches)."""
    filter_chains: tuple[FilterChain, ...] = ()
    """The port's Envoy filter chains as OSM builds them, oldest route first."""
    server_first: bool = False
    """An OSM tcp-server-first Egress is here: the port is never sniffed."""

    def sort(self) -> None:
        """Every candidate list oldest route first, so ties go to the oldest."""
        if self.envoy:
            self.filter_chains = envoy_filter_chains(self)
        if self.fixed is None and self.grpc:
            self.grpc_calls = HostTable()
            for pattern, rule in [*self.grpc.entries(), *self.http.entries()]:
                self.grpc_calls.add([pattern] if pattern else [], rule)
            self.grpc_calls.sort(position)
        self.tcp.sort(key=position)
        for hosts in (self.http, self.grpc, self.tls):
            hosts.sort(position)


def position(rule: CompiledRule) -> tuple[object, ...]:
    return rule.position


@dataclass(frozen=True)
class FilterChain:
    """One Envoy filter chain of an OSM port: an https or tcp Egress's, matching addresses
    (ipAddresses; none: any) and server names (an https Egress's hosts), or the port's one
    HTTP chain (rule None), which matches any address and plaintext HTTP only."""

    prefixes: tuple[IPNetwork, ...]
    server_names: tuple[str, ...]
    rule: CompiledRule | None

    def prefix_length(self, address: IPAddress) -> int:
        """How specific this chain's match of the address is; -1: no match."""
        if not self.prefixes:
            return 0
        return max((net.prefixlen for net in self.prefixes if address in net), default=-1)


def envoy_filter_chains(table: PortTable) -> tuple[FilterChain, ...]:
    """The chains OSM's listener builds for the port's Egresses (pkg/envoy/lds/egress.go)."""
    tls = {id(rule): rule for _, rule in table.tls.entries()}
    chains = [
        FilterChain(rule.rule.cidrs, rule.route.hostnames, rule)
        for rule in sorted([*tls.values(), *table.tcp], key=position)
    ]
    if table.http_chain:
        chains.append(FilterChain((), (), None))
    return tuple(chains)


def envoy_filter_chain(
    table: PortTable, address: IPAddress, server_name: str | None, plaintext_http: bool
) -> FilterChain | None:
    """The chain Envoy's filter chain match picks, None for none (Envoy closes the
    connection): among the chains matching the address most specifically, those naming the
    server name (exactly, else by the longest wildcard), else those naming none; then the
    HTTP chain for plaintext HTTP, else another. Each step keeps only what it picked, as
    Envoy never backtracks: TLS to an address an https Egress's ipAddresses cover, with a
    name it does not list, is not taken by a tcp Egress for every address."""
    longest = -1
    bucket: list[FilterChain] = []
    for chain in table.filter_chains:
        length = chain.prefix_length(address)
        if length > longest:
            longest, bucket = length, [chain]
        elif length == longest >= 0:
            bucket.append(chain)
    named = [chain for chain in bucket if chain.server_names]
    if server_name and named:
        for level in table.tls.levels(server_name):
            taken = [chain for chain in named if any(chain.rule is rule for rule in level)]
            if taken:
                return taken[0]
    bucket = [chain for chain in bucket if not chain.server_names]
    if plaintext_http:
        for chain in bucket:
            if chain.rule is None:
                return chain
    return next((chain for chain in bucket if chain.rule is not None), None)


FIX_PRIORITY = (RouteProtocol.GRPC, RouteProtocol.HTTP, RouteProtocol.TLS, RouteProtocol.TCP)


@dataclass
class CompiledNetwork:
    network: Network
    audit: bool
    routes_refused: str | None = None
    """Why Linkerd accepts no route attached to this network (see refusal); None: it does."""
    ports: dict[int, PortTable] = field(default_factory=dict)
    every_port: PortTable = field(default_factory=PortTable)

    def table(self, port: int) -> PortTable:
        return self.ports.get(port, self.every_port)


def linkerd_size(network: IPNetwork) -> int:
    """How many addresses Linkerd counts in a block (ipnet's hosts(): an IPv4 block larger
    than /31 without its network and broadcast addresses)."""
    if network.version == 4 and network.prefixlen < 31:
        return network.num_addresses - 2
    return network.num_addresses


def range_size(cidr: CidrRange) -> int:
    """Linkerd's Network::block_size: the cidr's addresses less its exceptions'."""
    return linkerd_size(cidr.cidr) - sum(linkerd_size(excepted) for excepted in cidr.excepts)


@dataclass(frozen=True)
class CidrEntry:
    size: int
    """Its addresses as Linkerd counts them: the smaller entry wins."""
    key: tuple[object, ...]
    """Its network's age and name: the older wins a tie."""
    cidr: CidrRange
    network: CompiledNetwork


@dataclass(frozen=True)
class PrefixLevel:
    """One prefix length of one address family, and the smallest entry size at it or at
    any shorter length: once a covering entry is smaller, no shorter prefix can win."""

    length: int
    entries: dict[int, list[CidrEntry]]
    """By network address."""
    smallest_from_here: int


class CidrTable:
    """Networks as Linkerd picks one (resolve_egress_network): of the entries covering an
    address, the smallest (its cidr's addresses less its exceptions'), then the oldest
    network, then namespace/name. Probed by prefix length, longest first, so a lookup costs
    at most 33 or 129 dict probes, and mostly stops at the first covering entry."""

    def __init__(self, entries: Sequence[tuple[CidrRange, CompiledNetwork]]) -> None:
        by_length: dict[tuple[int, int], dict[int, list[CidrEntry]]] = {}
        for cidr, network in entries:
            net = network.network
            key = age_key(net.created, net.order, net.id.namespace, net.id.name)
            level = by_length.setdefault((cidr.cidr.version, cidr.cidr.prefixlen), {})
            level.setdefault(int(cidr.cidr.network_address), []).append(
                CidrEntry(range_size(cidr), key, cidr, network)
            )
        self.levels: dict[int, tuple[PrefixLevel, ...]] = {}
        for version in (4, 6):
            lengths = sorted((n for v, n in by_length if v == version), reverse=True)
            smallest = [
                min(entry.size for same in by_length[version, n].values() for entry in same)
                for n in lengths
            ]
            levels = []
            for position, length in enumerate(lengths):
                by_address = by_length[version, length]
                for same in by_address.values():
                    same.sort(key=lambda entry: (entry.size, entry.key))
                levels.append(PrefixLevel(length, by_address, min(smallest[position:])))
            self.levels[version] = tuple(levels)

    def lookup(self, address: IPAddress) -> CompiledNetwork | None:
        bits = address.max_prefixlen
        value = int(address)
        best: CidrEntry | None = None
        for level in self.levels[address.version]:
            if best is not None and best.size < level.smallest_from_here:
                break
            masked = value >> (bits - level.length) << (bits - level.length)
            for entry in level.entries.get(masked, ()):
                if entry.cidr.covers(address):
                    if best is None or (entry.size, entry.key) < (best.size, best.key):
                        best = entry
                    break
        return best.network if best is not None else None


def refusal(network: Network, settings: Settings) -> str | None:
    """Linkerd's status controller does not accept an EgressNetwork whose explicit networks
    intersect a cluster network (EgressReasonNetworkOverlap: one block holds the other and
    no `except` holds the cluster network), nor any route attached to it; the network
    itself still takes its traffic, with the default routes."""
    if network.ranges is None or network.id.kind != "EgressNetwork":
        return None
    for entry in network.ranges:
        for cluster in settings.cluster_networks:
            holds = within(entry.cidr, cluster) or within(cluster, entry.cidr)
            if holds and not any(within(cluster, excepted) for excepted in entry.excepts):
                return (
                    f"its networks overlap {cluster} of --cluster-networks: Linkerd accepts"
                    " neither it nor its routes (EgressReasonNetworkOverlap); its traffic"
                    " takes the default routes"
                )
    return None


def default_ranges(settings: Settings) -> tuple[CidrRange, ...]:
    """Linkerd's EgressNetwork without `networks`: everything outside the cluster networks."""
    v4 = tuple(n for n in settings.cluster_networks if n.version == 4)
    v6 = tuple(n for n in settings.cluster_networks if n.version == 6)
    return (
        CidrRange(ipaddress.ip_network("0.0.0.0/0"), v4),
        CidrRange(ipaddress.ip_network("::/0"), v6),
    )


def covered_ranges(network: Network, settings: Settings) -> tuple[CidrRange, ...]:
    """The addresses a network takes: its `networks`, else everything outside the cluster
    networks (or, for OSM, what outboundIPRangeInclusionList names outside them), less
    what OSM's outboundIPRangeExclusionList leaves out."""
    interception = network.interception
    if network.ranges is not None:
        ranges = network.ranges
    elif interception is not None and interception.included is not None:
        cluster = settings.cluster_networks
        ranges = tuple(
            CidrRange(cidr, tuple(inside for inside in cluster if within(inside, cidr)))
            for cidr in interception.included
            if not any(within(cidr, outer) for outer in cluster)
        )
    else:
        ranges = default_ranges(settings)
    if interception is None:
        return ranges
    return tuple(
        narrowed for entry in ranges if (narrowed := without(entry, interception.excluded))
    )


def without(entry: CidrRange, excluded: Sequence[IPNetwork]) -> CidrRange | None:
    """entry with the excluded blocks inside it added to its excepts; None if one holds it."""
    if any(within(entry.cidr, block) for block in excluded):
        return None
    more = tuple(
        block
        for block in excluded
        if within(block, entry.cidr) and not any(within(block, known) for known in entry.excepts)
    )
    return dataclasses.replace(entry, excepts=entry.excepts + more) if more else entry


def networks_in_scope(networks: Sequence[Network], settings: Settings) -> list[Network]:
    """Linkerd's rule: the client's namespace's networks if any, else the global namespace's."""
    if settings.namespace is None:
        return list(networks)
    scoped_namespaces = {n.id.namespace for n in networks if n.namespace_scoped}
    visible = (
        settings.namespace if settings.namespace in scoped_namespaces else settings.egress_namespace
    )
    return [n for n in networks if not n.namespace_scoped or n.id.namespace == visible]


def serves_client(route: Route, network: Network, settings: Settings) -> bool:
    """Linkerd's (GAMMA's) producer and consumer routes: a route in its parent network's
    namespace serves every client, one in another namespace only that namespace's clients.
    An unset --namespace matches any namespace, so standalone every route applies."""
    if not network.namespace_scoped or settings.namespace is None:
        return True
    return route.ref.namespace in (network.id.namespace, settings.namespace)


def client_matches(clients: Sequence[ClientRef], settings: Settings) -> bool:
    """OSM Egress sources: an unset identity matches every source."""
    if not clients:
        return True
    return any(
        client.kind == "ServiceAccount"
        and settings.service_account in (None, client.name)
        and settings.namespace in (None, client.namespace)
        for client in clients
    )


def port_kinds(routes: Sequence[Route]) -> dict[tuple[NetworkId, int], RouteProtocol]:
    """The kind of Gateway API route each network port takes (GEP-1426: GRPCRoute, then
    HTTPRoute, TLSRoute, TCPRoute), over every route in the file whichever client it
    serves: Linkerd refuses a route of a lower kind on that port for every client."""
    kinds: dict[tuple[NetworkId, int], RouteProtocol] = {}
    for route in routes:
        if not route.fixes_protocol:
            continue
        for attachment in route.attachments:
            if attachment.port is None:
                continue
            port = (attachment.network, attachment.port)
            known = kinds.get(port)
            if known is None or FIX_PRIORITY.index(route.protocol) < FIX_PRIORITY.index(known):
                kinds[port] = route.protocol
    return kinds


def routes_unused(network: CompiledNetwork) -> str | None:
    """Why no route written for the network decides its traffic, if none does."""
    return network.network.routes_off or network.routes_refused


def compile_policy(model: Model, settings: Settings) -> PolicyIndex:
    """The index, with a warning for each network in scope whose routes Linkerd refuses,
    and for each rule address its network never takes."""
    index = PolicyIndex(model, settings)
    with_routes = {a.network for route in model.routes for a in route.attachments}
    for compiled in index.compiled.values():
        if compiled.routes_refused and compiled.network.id in with_routes:
            log.warning(
                "%s: %s: %s", compiled.network.origin, compiled.network.id, compiled.routes_refused
            )
    unreachable = unreachable_rule_cidrs(model, settings)
    for origin in sorted(unreachable, key=lambda origin: origin.line):
        log.warning("%s: %s", origin, unreachable[origin])
    return index


def unreachable_rule_cidrs(model: Model, settings: Settings) -> dict[Origin, str]:
    """A rule's addresses (native `cidrs`, OSM `ipAddresses`) outside every address its
    network takes, by the rule: no traffic there reaches the rule (a native deny of
    192.168.1.0/24, inside the default --cluster-networks, held for nothing)."""
    networks = {network.id: network for network in model.networks}
    taken: dict[NetworkId, AddressSpans] = {}
    outside: dict[tuple[Origin, str, NetworkId], dict[IPNetwork, None]] = {}
    for route in model.routes:
        for attachment in route.attachments:
            network = networks.get(attachment.network)
            if network is None:
                continue
            if network.id not in taken:
                taken[network.id] = AddressSpans(covered_ranges(network, settings))
            spans = taken[network.id]
            for rule in route.rules:
                key = (rule.origin, f"{route.ref.kind} {route_name(route.ref)}", network.id)
                unreached = outside.setdefault(key, {})
                unreached.update((cidr, None) for cidr in rule.cidrs if not spans.meets(cidr))
    return {
        origin: (
            f"{name}: {listed(list(cidrs))} {'is' if len(cidrs) == 1 else 'are'} outside"
            f" every address {network_id} takes"
            f" ({describe_taken(networks[network_id], settings)}): the rule matches no"
            " traffic there"
        )
        for (origin, name, network_id), cidrs in outside.items()
        if cidrs
    }


BLOCKS_LISTED = 10
"""A warning names this many blocks at most: a rule may have thousands."""


def listed(blocks: list[IPNetwork]) -> str:
    text = ", ".join(map(str, blocks[:BLOCKS_LISTED]))
    more = len(blocks) - BLOCKS_LISTED
    return text + (f" and {more} more" if more > 0 else "")


class AddressSpans:
    """The addresses of CIDR ranges less their excepts, as sorted disjoint spans of integers
    per address family: whether a block meets them takes a bisection, not a scan of every
    range (a policy may have 100,000 networks, and rules with as many cidrs)."""

    def __init__(self, ranges: Sequence[CidrRange]) -> None:
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for entry in ranges:
            start, end = int(entry.cidr.network_address), int(entry.cidr.broadcast_address)
            for excepted in sorted(entry.excepts, key=lambda block: int(block.network_address)):
                low, high = int(excepted.network_address), int(excepted.broadcast_address)
                if start < low:
                    spans[entry.cidr.version].append((start, min(end, low - 1)))
                start = max(start, high + 1)
            if start <= end:
                spans[entry.cidr.version].append((start, end))
        self.starts: dict[int, list[int]] = {}
        self.ends: dict[int, list[int]] = {}
        for version, found in spans.items():
            merged: list[tuple[int, int]] = []
            for start, end in sorted(found):
                if merged and start <= merged[-1][1] + 1:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], end))
                else:
                    merged.append((start, end))
            self.starts[version] = [start for start, _ in merged]
            self.ends[version] = [end for _, end in merged]

    def meets(self, block: IPNetwork) -> bool:
        """Whether some address of block is in the spans."""
        starts, ends = self.starts[block.version], self.ends[block.version]
        position = bisect.bisect_right(starts, int(block.broadcast_address)) - 1
        return position >= 0 and ends[position] >= int(block.network_address)


def describe_taken(network: Network, settings: Settings) -> str:
    if network.ranges is not None:
        return "its networks"
    if network.interception is not None:
        return "what the MeshConfig's outbound IP ranges leave outside --cluster-networks"
    cluster = ", ".join(str(block) for block in settings.cluster_networks)
    return f"everything outside --cluster-networks {cluster}"


MAX_MEMOISED_DECISIONS = 4096
MAX_MEMOISED_NETWORKS = 4096
"""Bounds the memo when many destinations are decided (it is cleared, not evicted, when full)."""
NO_HTTP_ROUTE = "no HTTPRoute matched"
MAX_MEMOISED_REQUEST_TEXT = 512
"""A request whose path and authority are longer together is decided without the memo, which
then holds at most MAX_MEMOISED_DECISIONS times this many characters of them."""

RequestKey = tuple[str, int, str | None, str, str, bool, str | None]
"""What a request's decision depends on when the policy matches no header or query:
destination (as its host text and port: a Destination hashes in Python, text in C),
hostname, method, path, gRPC or not, and the authority (OSM reads its port)."""


class PolicyIndex:
    """Immutable once built: decide_* only read it, so one index serves every connection.

    (Decisions already built are memoised: they depend only on the rule or network, the
    port and the protocol, and building one costs more than finding the rule. So are the
    answers to a connection's facts, which depend on nothing else, and a request's, by the
    facts the policy reads.)
    """

    def __init__(self, model: Model, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.decisions: dict[tuple[int, int, RouteProtocol, str], Decision] = {}
        self.untouched_decisions: dict[tuple[RouteProtocol, Destination], Decision] = {}
        self.networks: dict[Destination, CompiledNetwork | None] = {}
        """network_for's answers: a client talks to few destinations, each asked per request."""
        self.connection_decisions: dict[ConnectionFacts, Decision] = {}
        """decide_connection's answers: new connections mostly repeat a few destinations and
        names, and an HTTP connection's answer is a whole request's (`GET /`)."""
        self.request_decisions: dict[RequestKey, Decision] | None = (
            None if matches_headers_or_query(model) else {}
        )
        """decide_request's answers by RequestKey, when that is all the policy reads: a
        client's requests repeat a few paths, with queries and headers that vary."""
        self.reads_query = any(
            match.query
            for route in model.routes
            for rule in route.rules
            for match in rule.http_matches
        )
        """Whether a rule reads a request's query: if none does, two requests that differ in
        their query alone have one decision (a client's requests often do)."""
        self.compiled: dict[NetworkId, CompiledNetwork] = {}
        covered: list[tuple[CidrRange, CompiledNetwork]] = []
        for network in networks_in_scope(model.networks, settings):
            compiled = CompiledNetwork(
                network, network.audit or settings.audit, refusal(network, settings)
            )
            self.compiled[network.id] = compiled
            covered.extend((cidr, compiled) for cidr in covered_ranges(network, settings))
        self.cidrs = CidrTable(covered)
        self.port_kinds = port_kinds(model.routes)
        routes = sorted(
            (route for route in model.routes if client_matches(route.clients, settings)),
            key=route_age,
        )
        every_port = [
            (route, attachment)
            for route in routes
            for attachment in route.attachments
            if attachment.port is None
        ]
        for route in routes:
            for attachment in route.attachments:
                target = self.attached_network(route, attachment)
                if target is None or attachment.port is None or self.conflicted(route, attachment):
                    continue
                table = target.ports.setdefault(attachment.port, PortTable())
                self.add_route(table, route)
        for route, attachment in every_port:
            target = self.attached_network(route, attachment)
            if target is None:
                continue
            for table in [*target.ports.values(), target.every_port]:
                self.add_route(table, route)
        for compiled in self.compiled.values():
            for table in [*compiled.ports.values(), compiled.every_port]:
                table.sort()
        self.unsniffed_ports = settings.opaque_ports | frozenset(
            port
            for compiled in self.compiled.values()
            for port, table in compiled.ports.items()
            if table.server_first
        )
        """Ports where never_sniffed may be true, so that the data plane, which asks about
        every connection, looks no further for the others."""

    def attached_network(self, route: Route, attachment: Attachment) -> CompiledNetwork | None:
        """The network a parentRef attaches the route to, if it applies to this client."""
        target = self.compiled.get(attachment.network)
        if (
            target is None
            or target.routes_refused
            or not serves_client(route, target.network, self.settings)
        ):
            return None
        return target

    def conflicted(self, route: Route, attachment: Attachment) -> bool:
        """Whether Linkerd's status controller refuses the route on this parent and port
        (RouteReasonConflicted) for a route of a higher kind there, from any namespace."""
        if not route.fixes_protocol or attachment.port is None:
            return False
        return self.port_kinds[attachment.network, attachment.port] is not route.protocol

    def applies(self, route: Route) -> bool:
        """Whether the route decides any of this client's traffic: on some parent and port
        that takes it, not one where a route of another kind wins (RouteReasonConflicted)."""
        return client_matches(route.clients, self.settings) and any(
            self.attached_network(route, attachment) is not None
            and not self.conflicted(route, attachment)
            for attachment in route.attachments
        )

    def add_route(self, table: PortTable, route: Route) -> None:
        table.server_first = table.server_first or route.server_first
        if route.envoy_filter_chains:
            table.envoy = True
            table.http_chain = table.http_chain or route.protocol is HTTP_PROTOCOL
        if route.fixes_protocol:  # one kind per port: the others are conflicted
            table.fixed = route.protocol
        route_key = route_age(route)
        for rule_index, rule in enumerate(route.rules):
            compiled = CompiledRule(
                position=(*route_key, rule_index),
                rule=rule,
                route=route,
                http=tuple(CompiledHttpMatch(m) for m in rule.http_matches),
                grpc=tuple(CompiledGrpcMatch(m) for m in rule.grpc_matches),
                backend=self.backend(rule.backend),
            )
            if route.protocol == RouteProtocol.TCP:
                table.tcp.append(compiled)
            else:
                family = {
                    RouteProtocol.HTTP: table.http,
                    RouteProtocol.GRPC: table.grpc,
                    RouteProtocol.TLS: table.tls,
                }[route.protocol]
                family.add(route.hostnames, compiled)

    def backend(self, target: ServiceBackend | HostBackend | None) -> Backend | None:
        if isinstance(target, ServiceBackend):
            host = f"{target.name}.{target.namespace}.svc.{self.settings.cluster_domain}"
            return Backend(host, target.port)
        if isinstance(target, HostBackend):
            return Backend(target.host, target.port)
        return None

    # --- the data plane's questions -------------------------------------------------

    def network_for(self, destination: Destination) -> CompiledNetwork | None:
        try:
            return self.networks[destination]
        except KeyError:
            pass
        if len(self.networks) >= MAX_MEMOISED_NETWORKS:
            self.networks.clear()
        network = self.cidrs.lookup(destination.ip)
        interception = network.network.interception if network is not None else None
        if interception is not None and destination.port in interception.excluded_ports:
            network = None  # OSM's outboundPortExclusionList: never redirected
        self.networks[destination] = network
        return network

    def never_sniffed(self, destination: Destination) -> bool:
        """Whether the destination's port is in --opaque-ports, or server-first in its
        network (OSM's tcp-server-first): decided as opaque TCP at once."""
        if destination.port in self.settings.opaque_ports:
            return True
        network = self.network_for(destination)
        return network is not None and network.table(destination.port).server_first

    def port_protocol(self, destination: Destination) -> RouteProtocol | None:
        """The protocol the port's Gateway API routes fix; None: detect."""
        network = self.network_for(destination)
        return network.table(destination.port).fixed if network else None

    def decide_connection(self, facts: ConnectionFacts) -> Decision:
        """TLS, opaque and h2 connections, and HTTP/1 when decided for a whole connection.

        HTTP is decided here as a `GET /` to the connection's host; per-request
        handlers call decide_request with the real request instead. HTTP to an address
        no network covers is not read at all: it passes untouched, as opaque TCP.
        """
        decision = self.connection_decisions.get(facts)
        if decision is None:
            if len(self.connection_decisions) >= MAX_MEMOISED_DECISIONS:
                self.connection_decisions.clear()
            decision = self.connection_decisions[facts] = self._decide_connection(facts)
        return decision

    def _decide_connection(self, facts: ConnectionFacts) -> Decision:
        if facts.detected in (Detected.HTTP1, Detected.H2):
            if self.network_for(facts.destination) is None:
                return self.untouched(RouteProtocol.TCP, facts.destination)
            return self.decide_request(
                RequestFacts(facts.destination, facts.hostname, "GET", "/", "", (), grpc=False)
            )
        destination = facts.destination
        network = self.network_for(destination)
        protocol = RouteProtocol.TLS if facts.detected == Detected.TLS else RouteProtocol.TCP
        if network is None:
            return self.untouched(protocol, destination)
        table = network.table(destination.port)
        if table.envoy:
            return self.through_filter_chain(network, table, facts)
        if table.fixed == RouteProtocol.TLS and (
            facts.detected != Detected.TLS or facts.hostname is None
        ):
            what = "not TLS" if facts.detected != Detected.TLS else "TLS without a server name"
            return self.refused_on_fixed_port(
                network,
                destination,
                RouteProtocol.TLS,
                f"{what} on port {destination.port}, whose routes are TLSRoutes",
            )
        if facts.detected == Detected.TLS and table.fixed not in (
            RouteProtocol.HTTP,
            RouteProtocol.GRPC,
        ):
            if table.fixed != RouteProtocol.TCP:
                for level in table.tls.levels(facts.hostname):
                    for rule in level:
                        if rule.covers(destination.ip):
                            return self.matched(network, destination, RouteProtocol.TLS, rule)
            if table.fixed == RouteProtocol.TLS or (table.tls and not table.tcp):
                return self.default(network, destination, RouteProtocol.TLS, "no TLSRoute matched")
        if table.fixed not in (RouteProtocol.HTTP, RouteProtocol.GRPC):
            for rule in table.tcp:
                if rule.covers(destination.ip):
                    return self.matched(network, destination, RouteProtocol.TCP, rule)
        return self.default(network, destination, RouteProtocol.TCP, "no route matched")

    def decide_request(self, facts: RequestFacts) -> Decision:
        """decide_uncached_request's answer, from the memo where it applies: a RequestDecider
        made for this one request (a connection's handler keeps one for all of its own)."""
        return RequestDecider(self, facts.destination).decide(*facts[1:])

    def decide_uncached_request(self, facts: RequestFacts) -> Decision:
        """One HTTP/1 request, HTTP/2 stream or gRPC call, its path matched as normalised.

        A path with `;` or `\\` in it is decided again as some servers read it, and one
        with dot segments as servers that keep them do; when such a reading is denied, so is
        the request: else `/public/..;/admin` would pass a rule allowing `/public` on to a
        Tomcat's `/admin`, and `/admin/../public` on to an Express app's `/admin`. The first
        decision stands otherwise, so no request gets further than its path as written
        would."""
        written = facts.path
        path = normalized_path(written)
        if path is not written:
            facts = facts._replace(path=path)
        decision = self._decide_normalized(facts)
        if decision.action is DENY_ACTION:
            return decision
        readings = [with_dot_segments(written)] if path is not written else []
        if ";" in path or "\\" in path:
            readings.append(as_some_servers_read(path))
        for reading in readings:
            if reading is not None:
                other = self._decide_normalized(facts._replace(path=reading))
                if other.action is DENY_ACTION:
                    return other
        return decision

    def _decide_normalized(self, facts: RequestFacts) -> Decision:
        destination = facts.destination
        network = self.network_for(destination)
        grpc_port = False
        if network is not None:
            table = network.table(destination.port)
            grpc_port = table.fixed is GRPC_PROTOCOL or (
                table.fixed is None and bool(table.grpc) and (facts.grpc or not table.http)
            )
        protocol = GRPC_PROTOCOL if grpc_port else HTTP_PROTOCOL
        if network is None:
            return self.untouched(protocol, destination)
        if grpc_port:
            rule = best_grpc_rule(
                table.grpc if table.grpc_calls is None else table.grpc_calls, facts
            )
            if rule is not None:
                return self.matched(network, destination, GRPC_PROTOCOL, rule)
            if table.fixed is GRPC_PROTOCOL and (
                facts.method != "POST" or split_grpc_path(facts.path)[0] is None
            ):
                return self.not_a_call(network, destination)
            return self.unmatched_request(
                network, table, destination, GRPC_PROTOCOL, "no GRPCRoute matched"
            )
        if table.fixed in (TLS_PROTOCOL, TCP_PROTOCOL):
            return self.decide_connection(
                ConnectionFacts(destination, Detected.OPAQUE, facts.hostname)
            )
        if table.envoy:
            return self.through_http_chain(network, table, facts)
        if table.grpc_calls is not None and split_grpc_path(facts.path)[0] is not None:
            # A gRPC server may serve a call without content-type: application/grpc: a
            # request shaped like a call (/service/method) that a gRPC rule would deny as
            # one is denied as it is.
            as_call = best_grpc_rule(table.grpc_calls, facts)
            if (
                as_call is not None
                and as_call.rule.action is DENY_ACTION
                and as_call.route.protocol is GRPC_PROTOCOL
            ):
                return self.matched(network, destination, GRPC_PROTOCOL, as_call)
        rule = best_http_rule(table.http, facts)
        if rule is not None:
            return self.matched(network, destination, HTTP_PROTOCOL, rule)
        return self.unmatched_request(network, table, destination, HTTP_PROTOCOL, NO_HTTP_ROUTE)

    def unmatched_request(
        self,
        network: CompiledNetwork,
        table: PortTable,
        destination: Destination,
        protocol: RouteProtocol,
        why: str,
    ) -> Decision:
        """A request no HTTP or gRPC rule took, on a port where gRPC or HTTP rules are: a
        native rule for every connection takes it (Gateway API routes fix their port's
        protocol, so theirs never do); else the network's default."""
        if table.fixed is None:
            for rule in table.tcp:
                if rule.covers(destination.ip):
                    return self.matched(network, destination, protocol, rule)
        return self.default(network, destination, protocol, why)

    def through_filter_chain(
        self, network: CompiledNetwork, table: PortTable, facts: ConnectionFacts
    ) -> Decision:
        """A TLS or opaque connection on an OSM port: what its Envoy filter chain says."""
        destination = facts.destination
        tls = facts.detected == Detected.TLS
        chain = envoy_filter_chain(
            table, destination.ip, facts.hostname if tls else None, plaintext_http=False
        )
        if chain is None or chain.rule is None:
            protocol = TLS_PROTOCOL if tls and table.tls else TCP_PROTOCOL
            return self.default(network, destination, protocol, NO_FILTER_CHAIN)
        return self.matched(network, destination, chain.rule.route.protocol, chain.rule)

    def through_http_chain(
        self, network: CompiledNetwork, table: PortTable, request: RequestFacts
    ) -> Decision:
        """A request on an OSM port: a tcp Egress's chain may take it first (by its address);
        on the HTTP chain, only the http Egresses' routes, and nothing after them."""
        destination = request.destination
        chain = envoy_filter_chain(table, destination.ip, None, plaintext_http=True)
        if chain is None:
            return self.default(network, destination, HTTP_PROTOCOL, NO_FILTER_CHAIN)
        rule = best_http_rule(table.http, request) if chain.rule is None else chain.rule
        if rule is None:
            return self.default(network, destination, HTTP_PROTOCOL, NO_HTTP_ROUTE)
        return self.matched(network, destination, HTTP_PROTOCOL, rule)

    def not_a_call(self, network: CompiledNetwork, destination: Destination) -> Decision:
        """linkerd2-proxy's default egress route for gRPC, like every GRPCRoute match, takes
        only a POST of /service/method (a rule without matches takes anything): a request
        no rule took that is no call matches no route there (a 404), and is denied here."""
        return self.refused_on_fixed_port(
            network,
            destination,
            GRPC_PROTOCOL,
            f"{NOT_A_CALL} on port {destination.port}, whose routes are GRPCRoutes",
        )

    def refused_on_fixed_port(
        self, network: CompiledNetwork, destination: Destination, protocol: RouteProtocol, why: str
    ) -> Decision:
        """What no route of a port's fixed protocol can take: Linkerd's proxy finds no route
        for it (a TLS stack requires a server name; a gRPC route only takes calls) and
        fails it. Denied under the default deny route, whatever the network's default: a
        `tls-egress-allow` label on a denial would file it under what was allowed."""
        key = (id(network), destination.port, protocol, why)
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.remember(
                key,
                dataclasses.replace(
                    self.default(network, destination, protocol, ""),
                    action=Action.DENY,
                    route=RouteRef("", "default", "", f"{protocol.value}-egress-deny"),
                    reason=why,
                ),
            )
        return decision

    # --- building decisions ---------------------------------------------------------

    def parent(self, network: CompiledNetwork, destination: Destination) -> ParentRef:
        net = network.network.id
        return ParentRef(net.group, net.kind, net.namespace, net.name, str(destination.port))

    def matched(
        self,
        network: CompiledNetwork,
        destination: Destination,
        protocol: RouteProtocol,
        rule: CompiledRule,
    ) -> Decision:
        key = (id(rule), destination.port, protocol, "")
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.remember(key, self.build_matched(network, destination, protocol, rule))
        return decision

    def untouched(self, protocol: RouteProtocol, destination: Destination) -> Decision:
        """Traffic no network covers: one shared decision per address and protocol, so the
        metrics and the access log find what they made for it the last time."""
        key = (protocol, destination)
        decision = self.untouched_decisions.get(key)
        if decision is None:
            if len(self.untouched_decisions) >= MAX_MEMOISED_DECISIONS:
                self.untouched_decisions.clear()
            excluding = self.cidrs.lookup(destination.ip)  # a network whose port it is not
            decision = self.untouched_decisions[key] = no_network(protocol, destination, excluding)
        return decision

    def remember(self, key: tuple[int, int, RouteProtocol, str], decision: Decision) -> Decision:
        if len(self.decisions) >= MAX_MEMOISED_DECISIONS:
            self.decisions.clear()
        self.decisions[key] = decision
        return decision

    def build_matched(
        self,
        network: CompiledNetwork,
        destination: Destination,
        protocol: RouteProtocol,
        rule: CompiledRule,
    ) -> Decision:
        action = rule.rule.action
        return Decision(
            action=action,
            protocol=protocol,
            parent=self.parent(network, destination),
            route=rule.route.ref,
            backend=rule.backend,
            audit=network.audit,
            verify_destination=rule.route.verify_destination or network.network.verify_destination,
            reason=f"matched {rule.describe()}",
        )

    def default(
        self,
        network: CompiledNetwork,
        destination: Destination,
        protocol: RouteProtocol,
        why: str,
    ) -> Decision:
        key = (id(network), destination.port, protocol, why)
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.remember(key, self.build_default(network, destination, protocol, why))
        return decision

    def build_default(
        self,
        network: CompiledNetwork,
        destination: Destination,
        protocol: RouteProtocol,
        why: str,
    ) -> Decision:
        policy = network.network.traffic_policy
        allow = policy == TrafficPolicy.ALLOW
        action = Action.PASS if allow else Action.DENY
        name = f"{protocol.value}-egress-{'allow' if allow else 'deny'}"
        return Decision(
            action=action,
            protocol=protocol,
            parent=self.parent(network, destination),
            route=RouteRef("", "default", "", name),
            audit=network.audit,
            verify_destination=network.network.verify_destination,
            reason=f"{why} on port {destination.port} of {network.network.id}: "
            f"default {policy.value}"
            + (f" ({routes_off})" if (routes_off := routes_unused(network)) else ""),
        )

    def describe(self) -> dict[str, object]:
        """The loaded model as JSON-able data, for the admin /config endpoint."""
        return {
            "file": self.model.file,
            "networks": [
                {**as_dict(network), "applies": network.id in self.compiled}
                for network in self.model.networks
            ],
            "routes": [
                {**as_dict(route), "applies": self.applies(route)} for route in self.model.routes
            ],
        }


class RequestDecider:
    """decide_request for the requests of one connection, whose destination is fixed: its
    network and port table are found once, and on a port of HTTP rules alone (no gRPC,
    OSM or fixed TLS/TCP routes) a path read one way only (decide_uncached_request) is
    matched against the rules at once. A request decided anew (each its own path, say)
    costs a quarter fewer instructions; the facts are made only when the memo has no
    answer."""

    __slots__ = (
        "_destination",
        "_host",
        "_http",
        "_last_matched",
        "_network",
        "_port",
        "_table",
        "index",
    )

    def __init__(self, index: PolicyIndex, destination: Destination) -> None:
        self.index = index
        self._destination = destination
        self._host, self._port = destination.host, destination.port
        network = index.network_for(destination)
        table = network.table(destination.port) if network is not None else None
        self._network, self._table = network, table
        self._http = (
            table.http
            if table is not None
            and (table.fixed is HTTP_PROTOCOL or (table.fixed is None and not table.grpc))
            and not table.envoy
            else None
        )
        """The port's HTTP rules when they alone decide its requests; else None."""
        self._last_matched: tuple[CompiledRule | None, Decision | None] = (None, None)
        """The rule the shortcut last matched and its decision: a connection's requests
        mostly fall under one rule, and index.matched's lookup (a call, its key made and
        hashed) cost a decision made anew 1,700 of its 16,200 instructions."""

    def decide(
        self,
        hostname: str | None,
        method: str,
        path: str,
        query: str,
        headers: tuple[tuple[str, str], ...],
        grpc: bool,
        authority: str | None,
    ) -> Decision:
        """decide_uncached_request(RequestFacts(destination, hostname, …)), remembered in
        the index's memo by the facts a policy without header or query matches reads."""
        index = self.index
        memo = index.request_decisions
        key = None
        if memo is not None and len(path) + len(authority or "") <= MAX_MEMOISED_REQUEST_TEXT:
            key = (self._host, self._port, hostname, method, path, grpc, authority)
            decision = memo.get(key)
            if decision is not None:
                return decision
        facts = tuple.__new__(  # a C call, where RequestFacts(...) runs a Python __new__
            RequestFacts,
            (self._destination, hostname, method, path, query, headers, grpc, authority),
        )
        http = self._http
        if http is None or not read_one_way(path):
            decision = index.decide_uncached_request(facts)
        else:
            network, table = self._network, self._table
            assert network is not None and table is not None
            rule = best_http_rule(http, facts)
            last_rule, last_decision = self._last_matched
            if rule is None:
                decision = index.unmatched_request(
                    network, table, self._destination, HTTP_PROTOCOL, NO_HTTP_ROUTE
                )
            elif rule is last_rule and last_decision is not None:
                decision = last_decision
            else:
                decision = index.matched(network, self._destination, HTTP_PROTOCOL, rule)
                self._last_matched = (rule, decision)
        if key is not None and memo is not None:
            if len(memo) >= MAX_MEMOISED_DECISIONS:
                memo.clear()
            memo[key] = decision
        return decision


def read_one_way(path: str) -> bool:
    """Whether decide_uncached_request reads the path as written and no other way: it is as
    resolved as written (normalized_path) and has no `;` or `\\` (as_some_servers_read)."""
    return resolved_as_written(path) and ";" not in path and "\\" not in path


def no_network(
    protocol: RouteProtocol, destination: Destination, excluding: CompiledNetwork | None
) -> Decision:
    reason = (
        f"port {destination.port} is in the outboundPortExclusionList of {excluding.network.id}"
        if excluding is not None
        else f"{destination.ip} is covered by no egress network"
    )
    return Decision(
        action=Action.PASS,
        protocol=protocol,
        parent=None,
        route=None,
        reason=f"{reason}: passed untouched",
    )


def matches_headers_or_query(model: Model) -> bool:
    """Whether any rule of the model reads a request's headers or query."""
    return any(
        any(match.headers or match.query for match in rule.http_matches)
        or any(match.headers for match in rule.grpc_matches)
        for route in model.routes
        for rule in route.rules
    )


def best_http_rule(table: HttpRules, request: RequestFacts) -> CompiledRule | None:
    """Most specific hostname level first; within it Gateway API match precedence, then age
    (RankedLevel: the first match that fits, but for a RegularExpression that outranks it).

    A level holding an OSM route ends the search whatever it matched; an OSM route takes no
    request whose authority names another port than the destination's.
    """
    path = request.path
    for level in table.ranked_levels(request.hostname):
        query = (
            parse_qsl(request.query, keep_blank_values=True, encoding="latin-1")
            if level.reads_query
            else ()
        )
        exact = level.exact.get(path)  # most paths are no rule's Exact value: no call then
        best = _first_fitting(exact, request, query) if exact else None
        if best is None:
            best = _first_fitting(level.others, request, query)
        if level.patterns and (best is None or not best.match.exact_path):
            best = _best_pattern(level.patterns, best, request, query)
        if best is not None:
            return best.rule
        if level.most_specific_host_only:
            return None
    return None


def _first_fitting(
    ranked: Sequence[RankedMatch], request: RequestFacts, query: Sequence[tuple[str, str]]
) -> RankedMatch | None:
    for candidate in ranked:
        if candidate.by_path_alone:
            if candidate.match.path_matches(request.path):
                return candidate
        elif _fits(candidate, request, query):
            return candidate
    return None


def _best_pattern(
    patterns: Sequence[RankedMatch],
    best: RankedMatch | None,
    request: RequestFacts,
    query: Sequence[tuple[str, str]],
) -> RankedMatch | None:
    """best, or a RegularExpression match that fits and outranks it for this path."""
    rank: tuple[tuple[object, ...], int] | None = None
    if best is not None:
        rank = (best.match.score, -best.order)
    for candidate in patterns:
        candidate_rank = (candidate.match.score_for(request.path), -candidate.order)
        if (rank is None or candidate_rank > rank) and _fits(candidate, request, query):
            best, rank = candidate, candidate_rank
    return best


def _fits(candidate: RankedMatch, request: RequestFacts, query: Sequence[tuple[str, str]]) -> bool:
    rule = candidate.rule
    if not rule.covers(request.destination.ip):
        return False
    if rule.route.port_in_host_must_match and names_another_port(request):
        return False
    return candidate.match.matches(request, query)


def names_another_port(request: RequestFacts) -> bool:
    """Whether the authority names a port other than the destination's, as Envoy compares a
    `host:port` domain: as text, so `:080` and an empty `host:` are other ports too."""
    authority = request.authority
    if authority is None:
        return False
    authority = authority.strip()
    colon = authority.find(":", authority.rfind("]") + 1)  # past an IPv6 literal
    return colon >= 0 and authority[colon + 1 :] != str(request.destination.port)


def best_grpc_rule(table: HostTable[CompiledRule], request: RequestFacts) -> CompiledRule | None:
    """Most specific hostname level first; within it the best gRPC match and the best HTTP
    match (a rule without gRPC matches takes a call as the HTTP request it is), each by its
    family's precedence, then age. A deny of either wins, since an HTTP server serves a
    request that merely claims to be a gRPC call; else the gRPC match goes first."""
    service, method = split_grpc_path(request.path)
    query: list[tuple[str, str]] | None = None
    for level in table.levels(request.hostname):
        grpc_best: CompiledRule | None = None
        grpc_score: tuple[object, ...] = ()
        http_best: CompiledRule | None = None
        http_score: tuple[object, ...] = ()
        for rule in level:
            if not rule.covers(request.destination.ip):
                continue
            if rule.route.protocol is RouteProtocol.GRPC:
                for grpc_match in rule.grpc or (DEFAULT_GRPC_MATCH,):
                    call_score = grpc_match.score_for(service, method)
                    if (grpc_best is None or call_score > grpc_score) and grpc_match.matches(
                        service, method, request
                    ):
                        grpc_best, grpc_score = rule, call_score
                continue
            for http_match in rule.http or (DEFAULT_HTTP_MATCH,):
                score = http_match.score_for(request.path)
                if http_best is not None and score <= http_score:
                    continue
                if query is None and http_match.query:
                    query = parse_qsl(request.query, keep_blank_values=True, encoding="latin-1")
                if http_match.matches(request, query or ()):
                    http_best, http_score = rule, score
        if http_best is not None and (
            grpc_best is None
            or (http_best.rule.action is DENY_ACTION and grpc_best.rule.action is not DENY_ACTION)
        ):
            return http_best
        if grpc_best is not None:
            return grpc_best
    return None


def split_grpc_path(path: str) -> tuple[str | None, str | None]:
    """`/pkg.Service/Method` → (service, method), as linkerd2-proxy splits a path: its first
    two segments, either may be empty and more may follow; None, None: no call."""
    parts = path.split("/", 3)
    if len(parts) >= 3 and not parts[0]:
        return parts[1], parts[2]
    return None, None


def as_dict(value: Network | Route) -> dict[str, object]:
    described = jsonable(value)
    assert isinstance(described, dict)
    return described


def jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [jsonable(item) for item in value]
    if isinstance(value, frozenset):
        return [jsonable(item) for item in sorted(value)]
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value
