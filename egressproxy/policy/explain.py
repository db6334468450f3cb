"""`egressproxy check`: validate a policy, summarise it on one screen, explain one destination.

Everything a user can get wrong ends as `FILE:LINE: reason` on stderr and exit
status 1, never a traceback. DNS is never resolved: a hostname is assumed to
live at a documentation address outside the cluster networks, and the output
says so.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

from egressproxy.policy.decision import (
    Action,
    ConnectionFacts,
    Decision,
    Destination,
    Detected,
    IPAddress,
    RequestFacts,
    RouteProtocol,
    unmapped,
)
from egressproxy.policy.errors import PolicyError
from egressproxy.policy.index import (
    CompiledNetwork,
    PolicyIndex,
    PortTable,
    client_matches,
    compile_policy,
    covered_ranges,
    route_name,
    routes_unused,
    serves_client,
    wire_text,
)
from egressproxy.policy.loader import load_policy
from egressproxy.policy.model import Model, Network, Route, TrafficPolicy
from egressproxy.settings import Settings
from egressproxy.sniff.http import authority_host

ASSUMED_ADDRESSES = ("203.0.113.1", "198.51.100.1", "192.0.2.1", "2001:db8::1")
DEFAULT_PORTS = {"http": 80, "https": 443, "tls": 443, "grpc": 80}


def run_check(settings: Settings, explain: str | None) -> int:
    try:
        model, index = _compile_saying_what_is_skipped(settings)
    except PolicyError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 1
    if explain is None:
        print_summary(model, index, settings, sys.stdout)
        return 0
    try:
        query = parse_destination(explain, settings, index)
    except ValueError as error:
        print(f"egressproxy check: --explain {explain}: {error}", file=sys.stderr)
        return 2
    print_explanation(query, index, sys.stdout)
    return 0


def _compile_saying_what_is_skipped(settings: Settings) -> tuple[Model, PolicyIndex]:
    """The policy and its index, with the loader's info lines (documents and routes it
    skips, networks whose routes Linkerd refuses, each with FILE:LINE) on stderr, as `run`
    logs them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    policy_log = logging.getLogger("egressproxy.policy")
    level = policy_log.level
    policy_log.addHandler(handler)
    policy_log.setLevel(logging.INFO)
    try:
        model = load_policy(settings.policy_file)
        return model, compile_policy(model, settings)
    finally:
        policy_log.removeHandler(handler)
        policy_log.setLevel(level)


REFUSED_BESIDE = {
    RouteProtocol.GRPC: "; HTTP that is no gRPC call denied",
    RouteProtocol.TLS: "; anything but TLS with a server name denied",
}
"""What a port whose routes fix its protocol denies even on an Allow network (and, for
TLS, even where a TLSRoute takes every hostname: Linkerd's TLS stack requires one)."""


def print_summary(model: Model, index: PolicyIndex, settings: Settings, out: TextIO) -> None:
    client = (
        f"namespace {settings.namespace}" if settings.namespace else "any namespace (unset)"
    ) + (f", service account {settings.service_account}" if settings.service_account else "")
    print(
        f"{model.file}: valid, {len(model.networks)} network(s), {len(model.routes)} route(s)",
        file=out,
    )
    print(f"client: {client}", file=out)
    ports: dict[object, dict[int | None, list[Route]]] = defaultdict(lambda: defaultdict(list))
    for route in model.routes:
        for attachment in route.attachments:
            ports[attachment.network][attachment.port].append(route)
    for network in model.networks:
        applies = "applies" if network.id in index.compiled else "does not apply to this client"
        print(
            f"\n{network.id} ({network.origin}): default {network.traffic_policy.value}, {applies}",
            file=out,
        )
        print(f"  networks: {describe_ranges(network, settings)}", file=out)
        in_scope = index.compiled.get(network.id)
        routes_off = routes_unused(in_scope) if in_scope else network.routes_off
        if routes_off:
            print(f"  {routes_off}", file=out)
        verdict = "allow" if network.traffic_policy == TrafficPolicy.ALLOW else "deny"
        for port, routes in sorted(ports[network.id].items(), key=lambda item: item[0] or 0):
            where = f"port {port}" if port is not None else "every port"
            compiled = index.compiled.get(network.id)
            fixed = compiled.table(port).fixed if compiled and port is not None else None
            protocol = ""
            unsniffed = unsniffed_port(port, compiled, settings)
            if unsniffed and fixed is RouteProtocol.TLS:  # opaque there is "not TLS"
                protocol = f" ({unsniffed}: never sniffed, so all denied: tls-egress-deny)"
            elif unsniffed:
                protocol = f" ({unsniffed}: never sniffed, else tcp-egress-{verdict})"
            elif fixed:
                shown = verdict == "allow" or fixed is RouteProtocol.TLS
                refused = REFUSED_BESIDE.get(fixed, "") if shown else ""
                protocol = f" ({fixed.value.upper()}, else {fixed.value}-egress-{verdict}{refused})"
            taken = index.port_kinds.get((network.id, port)) if port is not None else None
            labels = "; ".join(
                route_label(route, taken)
                + (NEVER_SNIFFED if unsniffed and needs_sniffing(route) else "")
                + consumer_note(route, network, settings)
                for route in routes
            )
            print(f"  {where}{protocol}: {labels}", file=out)
        compiled = index.compiled.get(network.id)
        if compiled is None:  # out of this client's scope: its tables as for any client
            unscoped = dataclasses.replace(settings, namespace=None, service_account=None)
            compiled = compile_policy(model, unscoped).compiled[network.id]
        print(f"  otherwise: {unmatched_defaults(compiled, verdict, settings)}", file=out)
    if not model.networks:
        print("\nno egress networks: all traffic passes untouched", file=out)


NEVER_SNIFFED = " (never matches: the port is not sniffed)"


def unsniffed_port(port: int | None, network: CompiledNetwork | None, settings: Settings) -> str:
    """Why connections to this port are decided as opaque TCP at once, as the data plane
    (and --explain) decide them; "" when they are sniffed."""
    if port is None:
        return ""
    if port in settings.opaque_ports:
        return "in --opaque-ports"
    if network is not None and network.table(port).server_first:
        return "an OSM tcp-server-first port"
    return ""


def needs_sniffing(route: Route) -> bool:
    """A route only sniffed traffic can match: one of HTTP, gRPC or TLS, or with hostnames."""
    return route.protocol is not RouteProtocol.TCP or bool(route.hostnames)


def unmatched_defaults(network: CompiledNetwork, verdict: str, settings: Settings) -> str:
    """The default route of what no rule matches, as decide_* pick it: gRPC gets
    grpc-egress-* only on a port with gRPC rules (plain HTTP too when it has no HTTP rules),
    TLS gets tls-egress-* on a port with TLS rules and no TCP ones (OSM: with https
    Egresses). A port whose routes fix the protocol, or that is never sniffed, says its own
    default on its line; --opaque-ports take everything as other traffic."""

    def targets(table: PortTable) -> dict[str, str]:
        return {
            "HTTP": "grpc" if table.grpc and not table.http else "http",
            "gRPC": "grpc" if table.grpc else "http",
            "TLS": "tls" if table.tls and (table.envoy or not table.tcp) else "tcp",
            "other traffic": "tcp",
        }

    def said(kinds: dict[str, str]) -> str:
        by_target: dict[str, list[str]] = defaultdict(list)
        for kind, target in kinds.items():
            by_target[target].append(kind)
        return ", ".join(
            " and ".join(names) + f" → {target}-egress-{verdict}"
            for target, names in by_target.items()
        )

    base = targets(network.every_port)
    text = said(base)
    for port, table in sorted(network.ports.items()):
        if table.fixed is None and not unsniffed_port(port, network, settings):
            differs = {k: v for k, v in targets(table).items() if base[k] != v}
            if differs:
                text += f"; port {port}: {said(differs)}"
    opaque = ", ".join(
        str(port)
        for port in sorted(settings.opaque_ports)
        if network.table(port).fixed is not RouteProtocol.TLS  # said on the port's line
    )
    if opaque:
        text += f"; --opaque-ports {opaque}: everything → tcp-egress-{verdict}"
    return text


def route_label(route: Route, taken: RouteProtocol | None) -> str:
    """A route's kind and name, its hostnames, the protocol of an OSM or native rule, and
    whether the port's kind of route leaves it out (one kind of Gateway API route per port,
    whichever namespace the routes are in: a GRPCRoute makes the port's HTTPRoutes unused,
    a TLSRoute its TCPRoutes)."""
    label = f"{route.ref.kind} {route_name(route.ref)}"
    if route.hostnames:
        label += f" [{', '.join(route.hostnames)}]"
    if not route.fixes_protocol:  # an OSM or native rule: one route per protocol it covers
        label += f" ({route.protocol.value.upper()})"
    if taken is not None and route.fixes_protocol and route.protocol is not taken:
        label += f" (unused: the port's {taken.value.upper()} routes take precedence)"
    return label


def consumer_note(route: Route, network: Network, settings: Settings) -> str:
    """Says why a route decides nothing here: an OSM Egress whose sources are other
    clients, or a route from another namespace than its network's."""
    if not client_matches(route.clients, settings):
        sources = ", ".join(f"{client.namespace}/{client.name}" for client in route.clients)
        return f" (not for this client: its sources are {sources})"
    if serves_client(route, network, settings):
        return ""
    return f" (not for this client: a route in {route.ref.namespace} serves its clients only)"


def describe_ranges(network: Network, settings: Settings) -> str:
    interception = network.interception
    if network.ranges is None and interception is None and not settings.cluster_networks:
        return "everything (--cluster-networks is empty)"
    if network.ranges is None and interception is None:
        return "everything outside " + ", ".join(str(n) for n in settings.cluster_networks)
    described = (
        ", ".join(
            str(r.cidr) + (f" except {', '.join(str(e) for e in r.excepts)}" if r.excepts else "")
            for r in covered_ranges(network, settings)
        )
        or "none"
    )
    if interception is not None and interception.excluded_ports:
        ports = ", ".join(str(port) for port in sorted(interception.excluded_ports))
        described += f"; not port {ports} (outboundPortExclusionList)"
    return described


@dataclass(frozen=True)
class ExplainQuery:
    text: str
    connection: ConnectionFacts | None
    request: RequestFacts | None
    assumed: str
    """Why the IP address was chosen, when DEST named a host."""
    never_sniffed: str = ""
    """Why the port is never sniffed, so decided as opaque TCP ("" when it is sniffed)."""


def parse_destination(text: str, settings: Settings, index: PolicyIndex) -> ExplainQuery:
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "tls", "tcp", "grpc"):
        raise ValueError("use http://, https://, tls://, tcp:// or grpc:// followed by HOST[:PORT]")
    host = host_as_sent(parts.hostname or "").lower()
    if not host:
        raise ValueError("no host")
    try:
        port = parts.port
        if port == 0:  # not the scheme's default port, as `or` below would make it
            raise ValueError
    except ValueError:
        host_and_port = parts.netloc.rpartition("@")[2]
        if host_and_port.count(":") > 1 and "[" not in host_and_port:
            raise ValueError("an IPv6 address goes in brackets: [2001:db8::1]:443") from None
        raise ValueError("the port is not a number from 1 to 65535") from None
    port = port or DEFAULT_PORTS.get(scheme)
    if port is None:
        raise ValueError(f"{scheme}:// needs a port")
    address, assumed, hostname = resolve_without_dns(host, settings)
    destination = Destination(address, port)
    path = wire_text(parts.path or "/", "surrogateescape")
    never_sniffed = ""  # as the data plane: no sniffing, no hostname
    if port in settings.opaque_ports:
        never_sniffed = "in --opaque-ports"
    elif index.never_sniffed(destination):
        never_sniffed = "an OSM tcp-server-first port"
    if never_sniffed:
        facts = ConnectionFacts(destination, Detected.OPAQUE, None)
        return ExplainQuery(text, facts, None, assumed, never_sniffed=never_sniffed)
    if scheme in ("https", "tls"):
        facts = ConnectionFacts(destination, Detected.TLS, hostname)
        return ExplainQuery(text, facts, None, assumed)
    if scheme == "tcp":
        return ExplainQuery(
            text, ConnectionFacts(destination, Detected.OPAQUE, None), None, assumed
        )
    grpc = scheme == "grpc"
    headers = (("content-type", "application/grpc"),) if grpc else ()
    authority = host_as_sent(parts.netloc.rpartition("@")[2])
    request = RequestFacts(
        destination,
        authority_host(authority),  # as the data plane reads Host: an address is one too
        "POST" if grpc else "GET",
        path,
        wire_text(parts.query, "surrogateescape"),
        headers,
        grpc=grpc,
        authority=authority,
    )
    return ExplainQuery(text, None, request, assumed)


def host_as_sent(authority: str) -> str:
    """A host (or host:port) typed in Unicode as a client sends it: IDNA, as curl does
    (`bücher.example` is `xn--bcher-kva.example`), or else its bytes."""
    if authority.isascii():
        return authority
    try:
        return authority.encode("idna").decode("ascii")
    except UnicodeError:
        return wire_text(authority, "surrogateescape")


def resolve_without_dns(host: str, settings: Settings) -> tuple[IPAddress, str, str | None]:
    """(address, note, hostname) as the data plane sees them: an IP literal is used as is
    (an IPv4-mapped one as IPv4, a zone dropped), a name without its root label's dot gets
    an assumed address."""
    try:
        return unmapped(ipaddress.ip_address(host.strip("[]").split("%", 1)[0])), "", None
    except ValueError:
        pass
    hostname = host.removesuffix(".")
    for candidate in ASSUMED_ADDRESSES:
        address = ipaddress.ip_address(candidate)
        if not any(address in network for network in settings.cluster_networks):
            note = (
                f"{hostname} is not resolved (no DNS here): assuming {address}, "
                "an address outside the cluster networks"
            )
            return address, note, hostname
    inside = ", ".join(str(network) for network in settings.cluster_networks)
    raise ValueError(f"every documentation address is inside --cluster-networks ({inside})")


def print_explanation(query: ExplainQuery, index: PolicyIndex, out: TextIO) -> None:
    if query.connection is not None:
        decision = index.decide_connection(query.connection)
        destination = query.connection.destination
        hostname = query.connection.hostname
    else:
        assert query.request is not None
        decision = index.decide_request(query.request)
        destination = query.request.destination
        hostname = query.request.hostname
    print(f"destination: {query.text}", file=out)
    print(f"address:     {destination.ip} port {destination.port}", file=out)
    if query.assumed:
        print(f"             ({query.assumed})", file=out)
    print(f"hostname:    {hostname or '(none)'}", file=out)
    fixed = index.port_protocol(destination)
    protocol = f"protocol fixed by routes: {fixed.value.upper()}" if fixed else "detected"
    if query.never_sniffed:
        protocol = f"{query.never_sniffed}: never sniffed, decided as opaque TCP"
    print(f"port:        {protocol}", file=out)
    if query.request is not None and hostname and port_in_host_matters(index, destination):
        print(
            f"host:        OSM Egress hosts on port {destination.port} match Host {hostname} or "
            f"{hostname}:{destination.port}, never {hostname} with another port",
            file=out,
        )
    print_decision(decision, out)


def port_in_host_matters(index: PolicyIndex, destination: Destination) -> bool:
    """Whether an HTTP rule on the destination's port takes no Host naming another port
    (OSM's, whose Envoy virtual host domains are HOST and HOST:PORT)."""
    network = index.network_for(destination)
    if network is None:
        return False
    rules = network.table(destination.port).http.entries()
    return any(rule.route.port_in_host_must_match for _, rule in rules)


def _named(namespace: str, name: str) -> str:
    """namespace/name, or the name alone when there is no namespace (the native dialect)."""
    return f"{namespace}/{name}" if namespace else name


def print_decision(decision: Decision, out: TextIO) -> None:
    parent = decision.parent
    route = decision.route
    print(
        "network:     "
        + (
            f"{parent.kind} {_named(parent.namespace, parent.name)}"
            if parent
            else "none (not egress)"
        ),
        file=out,
    )
    print(
        "route:       " + (f"{route.kind} {route_name(route)}" if route else "none"),
        file=out,
    )
    action = {
        Action.PASS: "PASS to the original destination",
        Action.DENY: "DENY",
        Action.ROUTE: (f"ROUTE to {decision.backend}" if decision.backend else "ROUTE"),
    }[decision.action]
    if decision.audit and decision.action == Action.DENY:
        action += " (audit: logged as would_deny, the traffic passes)"
    print(f"action:      {action} ({decision.protocol.value})", file=out)
    if decision.verify_destination:
        verify = decision.verify_destination
        if decision.audit and verify == "enforce":
            verify += " (audit: a mismatch is logged, the traffic passes)"
        print(f"verify:      destination verification {verify}", file=out)
    print(f"why:         {decision.reason}", file=out)
    if parent and route:
        print(
            "labels:      "
            f'parent_group="{parent.group}" parent_kind="{parent.kind}" '
            f'parent_namespace="{parent.namespace}" parent_name="{parent.name}" '
            f'parent_port="{parent.port}" parent_section_name="" '
            f'route_group="{route.group}" route_kind="{route.kind}" '
            f'route_namespace="{route.namespace}" route_name="{route.name}"',
            file=out,
        )
