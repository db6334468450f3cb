"""OSM's egress resources: MeshConfig's enableEgress switch, Egress policies, SMI HTTPRouteGroups.

The MeshConfig becomes one network covering everything outside the cluster
networks, Allow when `spec.traffic.enableEgress` is true (and then, as in OSM,
no Egress policy applies), else Deny (OSM's default, also used when Egress
policies come without a MeshConfig). Each Egress policy becomes routes attached
to that network on its ports: `http` ports match Host (and HTTPRouteGroup
matches), `https` ports match SNI, `tcp` ports match the destination address
against `ipAddresses`. `spec.featureFlags.enableEgressPolicy: false` turns the
Egress API off, as in OSM v1.1 and v1.2: the policies are still checked, and
not applied.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from egressproxy.policy.decision import RouteProtocol, RouteRef, is_ip_literal
from egressproxy.policy.errors import Checker, ObjectMeta, YList, YMap, read_object_meta
from egressproxy.policy.linkerd import (
    HTTP_METHODS,
    TOP_LEVEL_FIELDS,
    kind_of,
    read_annotations,
)
from egressproxy.policy.model import (
    AUTHORITY,
    Attachment,
    ClientRef,
    HttpMatch,
    Interception,
    MatchKind,
    Network,
    NetworkId,
    Origin,
    PathMatch,
    Route,
    Rule,
    TrafficPolicy,
    ValueMatch,
)
from egressproxy.settings import IPNetwork

log = logging.getLogger(__name__)

CONFIG_GROUP = "config.openservicemesh.io"
POLICY_GROUP = "policy.openservicemesh.io"
SMI_GROUP = "specs.smi-spec.io"
SUPPORTED: dict[tuple[str, str], frozenset[str]] = {
    (CONFIG_GROUP, "MeshConfig"): frozenset({"v1alpha1", "v1alpha2", "v1alpha3"}),
    (POLICY_GROUP, "Egress"): frozenset({"v1alpha1"}),
    (SMI_GROUP, "HTTPRouteGroup"): frozenset({"v1alpha4"}),
}
MATCH_KINDS = {
    f"{SMI_GROUP}/v1alpha4": "HTTPRouteGroup",
    f"{POLICY_GROUP}/v1alpha1": "UpstreamTrafficSetting",
}
"""Egress.spec.matches: the apiGroup (group/version) and kind pairs OSM's webhook admits."""
EGRESS_CIDR = re.compile(r"(?:\d{1,3}\.){3}\d{1,3}/\d{1,2}")
IMPLICIT_MESH_CONFIG = ("osm-system", "osm-mesh-config")
MESH_CONFIG_SECTIONS = frozenset(
    {"sidecar", "traffic", "observability", "certificate", "featureFlags"}
)
TRAFFIC_FIELDS = frozenset(
    {
        "enableEgress",
        "enablePermissiveTrafficPolicyMode",
        "outboundIPRangeExclusionList",
        "outboundIPRangeInclusionList",
        "outboundPortExclusionList",
        "inboundPortExclusionList",
        "networkInterfaceExclusionList",
        "inboundExternalAuthorization",
        "useHTTPSIngress",
    }
)
FEATURE_FLAGS = frozenset(
    {
        "enableWASMStats",
        "enableEgressPolicy",
        "enableMulticlusterMode",
        "enableSnapshotCacheMode",
        "enableAsyncProxyServiceMapping",
        "enableIngressBackendPolicy",
        "enableEnvoyActiveHealthChecks",
        "enableRetryPolicy",
    }
)
"""The MeshConfig CRD's featureFlags (v1alpha1 to v1alpha3), all booleans."""
PROTOCOLS = {
    "http": RouteProtocol.HTTP,
    "https": RouteProtocol.TLS,
    "tcp": RouteProtocol.TCP,
    "tcp-server-first": RouteProtocol.TCP,
}
SERVER_FIRST = "tcp-server-first"
TCP_CHAINS = frozenset({"tcp", SERVER_FIRST})
"""The protocols OSM makes a TCP proxy filter chain of without server names."""


def read(
    documents: Sequence[tuple[int, YMap]], checker: Checker
) -> tuple[list[Network], list[Route]]:
    found = [
        read_one
        for order, document in documents
        if kind_of(document) == (CONFIG_GROUP, "MeshConfig")
        if (read_one := read_mesh_config(document, order, checker)) is not None
    ]
    mesh_configs = [network for network, _ in found]
    for extra in mesh_configs[1:]:
        checker.error(extra.origin.line, f"{extra.id}: only one MeshConfig may be given")
    groups: dict[tuple[str, str], list[RouteGroupMatch]] = {}
    for _, document in documents:
        if kind_of(document) != (SMI_GROUP, "HTTPRouteGroup"):
            continue
        meta, matches = read_route_group(document, checker)
        if meta is not None:
            groups[(meta.namespace, meta.name)] = matches
    egresses = [
        (order, document)
        for order, document in documents
        if kind_of(document) == (POLICY_GROUP, "Egress")
    ]
    if not egresses:
        return mesh_configs, []
    if found:
        mesh_config, policies_off = found[0]
    else:
        first_order, first = egresses[0]
        namespace, name = IMPLICIT_MESH_CONFIG
        mesh_config = mesh_network(
            namespace, name, TrafficPolicy.DENY, first_order, checker.file, first.line
        )
        policies_off = None
    routes = [
        route
        for order, document in egresses
        for route in read_egress(document, order, checker, mesh_config.id, groups)
    ]
    if mesh_config.traffic_policy is TrafficPolicy.ALLOW:
        # OSM: "Mesh-wide global egress is enabled, so EgressPolicy is implicitly disabled".
        log.info(
            "%s: %s: enableEgress is true: its %d Egress policies are not applied",
            mesh_config.origin,
            mesh_config.id,
            len(egresses),
        )
        return [mesh_config], []
    if policies_off is not None:
        # OSM v1.1/v1.2: with the flag off, GetEgressTrafficPolicy returns no policy.
        log.info(
            "%s: %s: featureFlags.enableEgressPolicy is false: "
            "its %d Egress policies are not applied",
            policies_off,
            mesh_config.id,
            len(egresses),
        )
        return [mesh_config], []
    warn_envoy_rejections(routes, checker.file)
    return [mesh_config], routes


def warn_envoy_rejections(routes: Sequence[Route], file: str) -> None:
    """Warn of Egresses OSM would build into an Envoy configuration that Envoy rejects
    for a client they share (keeping its previous one): two filter chains of one port
    that differ yet share an address range (or both have none) and a server name (or
    both have none), or two http Egresses of one port listing one host (a virtual host
    domain twice). OSM deduplicates identical chains, so those are fine; a tcp and a
    tcp-server-first chain are not identical (OSM names their traffic matches by
    protocol) though Envoy sees one match. Here the older chain decides, and both hosts'
    routes apply. One Egress's own ports are warn_port_listed_again's."""
    first_of: dict[tuple[object, ...], tuple[Route, object]] = {}
    warned: set[tuple[RouteRef, RouteRef, int | None]] = set()
    for route in routes:
        http = route.protocol is RouteProtocol.HTTP
        cidrs = () if http else route.rules[0].cidrs
        chain = (route.protocol, route.server_first, frozenset(route.hostnames), frozenset(cidrs))
        leaves: list[tuple[object, ...]] = (
            [(host,) for host in route.hostnames]
            if http
            else [(cidr, name) for cidr in cidrs or (None,) for name in route.hostnames or (None,)]
        )
        ports = {attachment.port for attachment in route.attachments}
        for client, port, leaf in itertools.product(route.clients, ports, leaves):
            earlier, earlier_chain = first_of.setdefault(
                (client, port, http, *leaf), (route, chain)
            )
            pair = (earlier.ref, route.ref, port)
            same_egress = earlier.order == route.order
            if same_egress or (earlier_chain == chain and not http) or pair in warned:
                continue
            warned.add(pair)
            log.warning(
                "%s:%d: Egress %s: port %s overlaps Egress %s (line %d) for ServiceAccount "
                "%s/%s on %s: OSM's Envoy rejects the configuration it makes of the two, and "
                "keeps its previous one",
                file,
                route.origin.line,
                f"{route.ref.namespace}/{route.ref.name}",
                port,
                f"{earlier.ref.namespace}/{earlier.ref.name}",
                earlier.origin.line,
                client.namespace,
                client.name,
                describe_leaf(leaf),
            )


def describe_leaf(leaf: tuple[object, ...]) -> str:
    if len(leaf) == 1:
        return f"host {leaf[0]}"
    cidr, name = leaf
    return (f"addresses {cidr}" if cidr else "any address") + (
        f" and server name {name}" if name else " and no server name"
    )


def mesh_network(
    namespace: str, name: str, policy: TrafficPolicy, order: int, file: str, line: int
) -> Network:
    return Network(
        id=NetworkId(CONFIG_GROUP, "MeshConfig", namespace, name),
        ranges=None,
        traffic_policy=policy,
        namespace_scoped=False,
        audit=False,
        verify_destination=None,
        created=None,
        order=order,
        origin=Origin(file, line),
    )


def read_mesh_config(
    document: YMap, order: int, checker: Checker
) -> tuple[Network, Origin | None] | None:
    """The MeshConfig's network, and where it turns Egress policies off (else None)."""
    checker.known_fields(document, "MeshConfig", TOP_LEVEL_FIELDS)
    meta = read_object_meta(checker, document, "MeshConfig")
    if meta is None:
        return None
    where = f"MeshConfig {meta.namespace}/{meta.name}.spec"
    spec = checker.get(document, "spec", YMap, where) or YMap(document.line)
    checker.known_fields(spec, where, MESH_CONFIG_SECTIONS)
    traffic = checker.get(spec, "traffic", YMap, where) or YMap(spec.line)
    checker.known_fields(traffic, f"{where}.traffic", TRAFFIC_FIELDS)
    enabled = checker.get(traffic, "enableEgress", bool, f"{where}.traffic")
    policies_off = read_feature_flags(checker, spec, where)
    audit, verify = read_annotations(checker, meta, where)
    network = Network(
        id=NetworkId(CONFIG_GROUP, "MeshConfig", meta.namespace, meta.name),
        ranges=None,
        traffic_policy=TrafficPolicy.ALLOW if enabled else TrafficPolicy.DENY,
        namespace_scoped=False,
        audit=audit,
        verify_destination=verify,
        created=meta.created,
        order=order,
        origin=Origin(checker.file, meta.line),
        routes_off=(
            f"Egress policies are off: featureFlags.enableEgressPolicy is false at {policies_off}"
            if policies_off is not None
            else None
        ),
        interception=read_interception(checker, traffic, f"{where}.traffic"),
    )
    return network, policies_off


def read_interception(checker: Checker, traffic: YMap, where: str) -> Interception | None:
    """The outbound lists OSM's injector turns into iptables RETURN rules; None: none set."""

    def cidrs(key: str) -> tuple[IPNetwork, ...]:
        return tuple(
            network
            for line, text in checker.strings(traffic, key, where)
            if (network := checker.network(text, line, f"{where}.{key}")) is not None
        )

    included = cidrs("outboundIPRangeInclusionList")
    excluded = cidrs("outboundIPRangeExclusionList")
    ports = frozenset(
        number
        for index, line, item in checker.items(traffic, "outboundPortExclusionList", where)
        if (number := checker.port_value(item, line, f"{where}.outboundPortExclusionList[{index}]"))
        is not None
    )
    if not (included or excluded or ports):
        return None
    return Interception(included or None, excluded, ports)


def read_feature_flags(checker: Checker, spec: YMap, where: str) -> Origin | None:
    """Where enableEgressPolicy is false, else None. Unset is on: the value `osm install`
    writes (its chart's default), which the guide's merge patches keep."""
    flags = checker.get(spec, "featureFlags", YMap, where)
    if flags is None:
        return None
    flags_where = f"{where}.featureFlags"
    checker.known_fields(flags, flags_where, FEATURE_FLAGS)
    values = {
        name: checker.get(flags, name, bool, flags_where) for name in flags if name in FEATURE_FLAGS
    }
    if values.get("enableEgressPolicy") is not False:
        return None
    return Origin(checker.file, flags.line_of("enableEgressPolicy"))


@dataclass(frozen=True)
class RouteGroupMatch:
    name: str
    match: tuple[HttpMatch, ...]
    line: int


def read_route_group(
    document: YMap, checker: Checker
) -> tuple[ObjectMeta | None, list[RouteGroupMatch]]:
    checker.known_fields(document, "HTTPRouteGroup", TOP_LEVEL_FIELDS)
    meta = read_object_meta(checker, document, "HTTPRouteGroup")
    if meta is None:
        return None, []
    where = f"HTTPRouteGroup {meta.namespace}/{meta.name}.spec"
    spec = checker.get(document, "spec", YMap, where, required=True)
    if spec is None:
        return meta, []
    checker.known_fields(spec, where, {"matches"})
    found = []
    for index, (item_where, item) in enumerate(checker.mappings(spec, "matches", where)):
        checker.known_fields(item, item_where, {"name", "pathRegex", "methods", "headers"})
        name = checker.get(item, "name", str, item_where) or f"matches[{index}]"
        path = None
        regex = checker.get(item, "pathRegex", str, item_where)
        line = item.line_of("pathRegex")
        if regex is not None and checker.path_regex(regex, line, item_where) is not None:
            path = PathMatch(MatchKind.REGEX, regex)
        headers = []
        header_map = None
        if isinstance(item.get("headers"), YList):  # Gateway API's form, not SMI's
            checker.error(
                item.line_of("headers"),
                f"{item_where}.headers: expected a mapping of each header name to a regular "
                "expression (`headers: {user-agent: '.*Android.*'}`), got a list",
            )
        else:
            header_map = checker.get(item, "headers", YMap, item_where)
        for header, value in (header_map or {}).items():
            line = header_map.line_of(header) if header_map is not None else item.line
            text = checker.typed(value, str, line, f"{item_where}.headers.{header}")
            if checker.header_name(header, line, f"{item_where}.headers") is None:
                continue
            header_where = f"{item_where}.headers.{header}"
            if text is not None and checker.regex(text, line, header_where) is not None:
                # OSM makes `host` a matcher of Envoy's :authority, and any other spelling
                # one of that name, which Envoy lower-cases and finds as the :authority entry
                # of its header map: the Host of HTTP/1 requests either way.
                header_field = AUTHORITY if header.lower() == "host" else header.lower()
                headers.append(ValueMatch(header_field, MatchKind.REGEX, text))
        methods = []
        for line, method in checker.strings(item, "methods", item_where):
            if method != "*" and method not in HTTP_METHODS:
                checker.error(
                    line,
                    f"{item_where}.methods: {method!r} is not one of *, "
                    f"{', '.join(HTTP_METHODS)} (the HTTPRouteGroup CRD's values)",
                )
            methods.append(method)
        if not methods or "*" in methods:
            matches: tuple[HttpMatch, ...] = (HttpMatch(path=path, headers=tuple(headers)),)
        else:
            matches = tuple(
                HttpMatch(path=path, method=method, headers=tuple(headers)) for method in methods
            )
        found.append(RouteGroupMatch(name, matches, item.line))
    return meta, found


def read_egress(
    document: YMap,
    order: int,
    checker: Checker,
    parent: NetworkId,
    groups: dict[tuple[str, str], list[RouteGroupMatch]],
) -> list[Route]:
    checker.known_fields(document, "Egress", TOP_LEVEL_FIELDS)
    meta = read_object_meta(checker, document, "Egress")
    if meta is None:
        return []
    where = f"Egress {meta.namespace}/{meta.name}.spec"
    spec = checker.get(document, "spec", YMap, where, required=True)
    if spec is None:
        return []
    checker.known_fields(spec, where, {"sources", "hosts", "ipAddresses", "ports", "matches"})
    clients, sources_again = read_sources(checker, spec, where)
    # OSM admits an IPv4 host: Envoy matches it against the Host header of its http ports.
    host_lines = []
    star_lines = []
    hosts_given = False
    for line, text in checker.strings(spec, "hosts", where):
        hosts_given = True
        if text.strip() == "*":
            star_lines.append(line)
        elif (
            hostname := checker.hostname(text, line, f"{where}.hosts", addresses=None)
        ) is not None:
            host_lines.append((line, hostname))
    hosts = tuple(hostname for _, hostname in host_lines)
    cidrs = tuple(
        network
        for line, text in checker.strings(spec, "ipAddresses", where)
        if (network := egress_cidr(checker, text, line, f"{where}.ipAddresses")) is not None
    )
    if spec.get("ports") is None:  # null is unset in Kubernetes: still missing
        checker.error(spec.line_of("ports"), f"{where}: missing required field 'ports'")
    ports: dict[str, list[int]] = {}
    listed: list[ListedPort] = []
    for index, (item_where, item) in enumerate(checker.mappings(spec, "ports", where)):
        checker.known_fields(item, item_where, {"number", "protocol"})
        number = checker.port(item, "number", item_where, required=True)
        name = checker.get(item, "protocol", str, item_where, required=True)
        if name is not None and name not in PROTOCOLS:
            checker.error(
                item.line_of("protocol"),
                f"{item_where}.protocol: {name!r} is not one of {', '.join(PROTOCOLS)}"
                " (lower case: OSM's listener builds a filter chain for no other spelling)",
            )
        elif number is not None and name is not None:
            port = ListedPort(number, name, index, item.line)
            warn_port_listed_again(checker.file, where, port, listed, bool(hosts))
            listed.append(port)
            if number not in ports.setdefault(name, []):
                ports[name].append(number)
    if "http" in ports and hosts:
        warn_sources_listed_again(checker.file, sources_again)
    for line in star_lines:
        refuse_star_host(checker, line, where, ports)
    if "https" in ports:
        warn_address_hosts(checker, host_lines, where)
    if "http" in ports and cidrs:
        log.warning(
            "%s:%d: %s.ipAddresses: they do not restrict its http ports (as in OSM, whose HTTP "
            "filter chain matches any address), only its https and tcp ones",
            checker.file,
            spec.line_of("ipAddresses"),
            where,
        )
    if hosts:
        warn_hosts_on_tcp_ports(checker.file, spec.line_of("hosts"), where, ports, bool(cidrs))
    http_rules = read_egress_matches(checker, spec, where, meta, groups)
    origin = Origin(checker.file, meta.line)
    if not clients:
        # OSM applies an Egress to the sources it lists: with none, to no client.
        log.info("%s: %s: no sources: it applies to no client", origin, where)
        return []
    routes = []
    for name, numbers in ports.items():
        protocol = PROTOCOLS[name]
        rules: tuple[Rule, ...] = (Rule(name="egress", cidrs=cidrs, origin=origin),)
        if protocol == RouteProtocol.HTTP:
            # OSM builds HTTP routes per host and per match: without either, none, and its
            # port still has the HTTP filter chain, which then takes plaintext HTTP to 404.
            rules = (Rule(name="egress", origin=origin),) if http_rules is None else http_rules
            if not hosts or not rules:
                if hosts or not hosts_given:  # else the refused hosts said why
                    nothing = "no HTTPRouteGroup matches" if hosts else "no hosts"
                    log.info("%s: %s: %s: its http ports allow nothing", origin, where, nothing)
                rules = ()
        routes.append(
            Route(
                ref=RouteRef(POLICY_GROUP, "Egress", meta.namespace, meta.name),
                protocol=protocol,
                fixes_protocol=False,
                hostnames=hosts if protocol != RouteProtocol.TCP else (),
                rules=rules,
                attachments=tuple(Attachment(parent, port) for port in numbers),
                clients=clients,
                created=meta.created,
                order=order,
                origin=origin,
                most_specific_host_only=True,
                port_in_host_must_match=True,
                envoy_filter_chains=True,
                server_first=name == SERVER_FIRST,
            )
        )
    return routes


@dataclass(frozen=True)
class ListedPort:
    """One entry of an Egress's ports, where it was written."""

    number: int
    protocol: str
    index: int
    line: int


def warn_port_listed_again(
    file: str, where: str, port: ListedPort, earlier: Sequence[ListedPort], has_hosts: bool
) -> None:
    """Warn of a port number an Egress lists again where OSM gives Envoy configuration it
    rejects for the Egress's sources (which keep their previous one): an http port twice
    puts each host's virtual host twice in the port's route configuration (a domain
    twice); tcp beside tcp-server-first, or https without hosts beside either, makes two
    filter chains with one match (the port, the ipAddresses, no server name). Other
    repeats are identical chains, which OSM deduplicates, or chains Envoy tells apart."""
    unnamed_chains = TCP_CHAINS if has_hosts else TCP_CHAINS | {"https"}
    for first in earlier:
        if first.number != port.number:
            continue
        pair = {first.protocol, port.protocol}
        if pair == {"http"} and has_hosts:
            built = "each host's virtual host twice in the port's route configuration"
        elif len(pair) == 2 and pair <= unnamed_chains:
            built = (
                "two filter chains of the port with one match (the port, the ipAddresses, "
                "no server name)"
            )
        else:
            continue
        log.warning(
            "%s:%d: %s.ports[%d]: port %d is listed again (ports[%d], line %d, %s): OSM gives "
            "Envoy %s, which Envoy rejects for the Egress's sources, keeping their previous "
            "configuration",
            file,
            port.line,
            where,
            port.index,
            port.number,
            first.index,
            first.line,
            first.protocol,
            built,
        )
        return


def refuse_star_host(checker: Checker, line: int, where: str, ports: dict[str, list[int]]) -> None:
    """`*` in hosts, which the Egress CRD admits, allows nothing as OSM builds it: on an
    http port it is Envoy's catch-all virtual host, whose cluster (`*:PORT`, STRICT_DNS)
    sends requests to what DNS answers for the name `*`, never to the host they name; on
    an https port it is a server name Envoy refuses (only `*.` wildcards), so the listener
    is rejected. An error rather than a rule no traffic could use. tcp ports read no
    hosts."""
    reasons = []
    if "http" in ports:
        reasons.append(
            f"on http {numbered(ports['http'])} OSM makes it Envoy's catch-all virtual host, "
            "whose requests go to the addresses DNS gives for the name '*', never to the host "
            "they name"
        )
    if "https" in ports:
        reasons.append(
            f"on https {numbered(ports['https'])} OSM makes it a server name of the filter "
            "chain, which Envoy refuses (partial wildcards are not supported in server_names), "
            "rejecting the whole listener"
        )
    if reasons:
        checker.error(
            line,
            f"{where}.hosts: '*' allows nothing as OSM builds it: {'; '.join(reasons)}. "
            "Name the hosts (*.example.com for a domain's), or allow every destination of "
            "a port with protocol tcp",
        )


def warn_hosts_on_tcp_ports(
    file: str, line: int, where: str, ports: dict[str, list[int]], has_addresses: bool
) -> None:
    """OSM reads hosts only on http (Host) and https (SNI) ports: a tcp port of an Egress
    listing `db.example.com` allows every destination, which the file does not show."""
    tcp = [name for name in PROTOCOLS if name in TCP_CHAINS and name in ports]
    if not tcp:
        return
    count = sum(len(ports[name]) for name in tcp)
    log.warning(
        "%s:%d: %s.hosts: they do not restrict its %s, which %s every destination%s (as in "
        "OSM, which reads hosts only on http and https ports)%s",
        file,
        line,
        where,
        " and ".join(f"{name} {numbered(ports[name])}" for name in tcp),
        "allows" if count == 1 else "allow",
        " in its ipAddresses" if has_addresses else "",
        "" if has_addresses else "; match addresses with ipAddresses",
    )


def numbered(ports: Sequence[int]) -> str:
    return ("port " if len(ports) == 1 else "ports ") + ", ".join(map(str, ports))


def warn_address_hosts(checker: Checker, host_lines: list[tuple[int, str]], where: str) -> None:
    """An IP host never matches on an https port (SNI is a name, never an address: RFC 6066
    3), as in OSM, whose filter chain matches server names."""
    for line, host in host_lines:
        if is_ip_literal(host):
            log.warning(
                "%s:%d: %s.hosts: %r never matches on https ports (SNI never carries an "
                "address); match addresses with ipAddresses on a tcp port",
                checker.file,
                line,
                where,
                host,
            )


def egress_cidr(checker: Checker, text: str, line: int, where: str) -> IPNetwork | None:
    """The Egress CRD admits IPv4 CIDRs with a prefix length only: no bare address, no IPv6."""
    if EGRESS_CIDR.fullmatch(text) is None:
        checker.error(line, f"{where}: {text!r} is not an IPv4 CIDR a.b.c.d/n (the Egress CRD's)")
        return None
    return checker.network(text, line, where)


def read_sources(
    checker: Checker, spec: YMap, where: str
) -> tuple[tuple[ClientRef, ...], list[tuple[str, int]]]:
    """The clients, and (where, line) of each source that names one named before."""
    if spec.get("sources") is None:
        checker.error(spec.line_of("sources"), f"{where}: missing required field 'sources'")
    clients: list[ClientRef] = []
    again = []
    for item_where, item in checker.mappings(spec, "sources", where):
        checker.known_fields(item, item_where, {"kind", "name", "namespace"})
        kind = checker.get(item, "kind", str, item_where, required=True)
        name = checker.get(item, "name", str, item_where, required=True)
        namespace = checker.get(item, "namespace", str, item_where, required=True)
        if kind is not None and kind != "ServiceAccount":
            checker.error(
                item.line_of("kind"), f"{item_where}.kind: only ServiceAccount is supported"
            )
        elif kind and name and namespace:
            client = ClientRef(kind, namespace, name)
            if client in clients:
                again.append((item_where, item.line))
            clients.append(client)
    return tuple(clients), again


def warn_sources_listed_again(file: str, again: Sequence[tuple[str, int]]) -> None:
    """OSM builds an Egress's http routes once per source entry that names the client
    (ListEgressPoliciesForSourceIdentity), so a service account listed twice puts each
    host's virtual host twice in the port's route configuration, which Envoy rejects."""
    for where, line in again:
        log.warning(
            "%s:%d: %s: this service account is listed again: OSM gives Envoy each host's "
            "virtual host twice in the http port's route configuration, which Envoy rejects "
            "for it, keeping its previous configuration",
            file,
            line,
            where,
        )


def refuse_upstream_traffic_setting(
    checker: Checker, line: int, where: str, namespace: str, name: str | None
) -> None:
    """OSM (v1.1 on) puts an UpstreamTrafficSetting's connectionSettings on the Egress's
    clusters, and ignores the whole Egress when the setting does not exist: accepting the
    match would leave limits the user relies on silently unenforced."""
    checker.error(
        line,
        f"{where}: UpstreamTrafficSetting {namespace}/{name} is not supported: OSM applies its "
        "connectionSettings (tcp connectTimeout and maxConnections, http maxRequests, "
        "maxPendingRequests, maxRequestsPerConnection and maxRetries) to the Egress's "
        "upstream clusters, and ignores the whole Egress when it does not exist; egressproxy "
        "enforces none of them. Remove the match (--connect-timeout sets the connect timeout "
        "for every destination)",
    )


def read_egress_matches(
    checker: Checker,
    spec: YMap,
    where: str,
    meta: ObjectMeta,
    groups: dict[tuple[str, str], list[RouteGroupMatch]],
) -> tuple[Rule, ...] | None:
    """One rule per HTTPRouteGroup match named by `matches`; None when `matches` names no
    HTTPRouteGroup (every request); empty when the groups it names have no matches (no
    request, as in OSM, whose Envoy then gets a route configuration without routes)."""
    rules: list[Rule] = []
    named = False
    for item_where, item in checker.mappings(spec, "matches", where):
        checker.known_fields(item, item_where, {"apiGroup", "kind", "name"})
        api_group = checker.get(item, "apiGroup", str, item_where, required=True)
        kind = checker.get(item, "kind", str, item_where, required=True)
        name = checker.get(item, "name", str, item_where, required=True)
        if api_group is None or kind is None:
            continue
        expected = MATCH_KINDS.get(api_group)
        if expected is None:
            checker.error(
                item.line_of("apiGroup"),
                f"{item_where}.apiGroup: {api_group!r} is not one of {', '.join(MATCH_KINDS)}",
            )
            continue
        if kind != expected:
            checker.error(
                item.line_of("kind"),
                f"{item_where}.kind: expected {expected} for apiGroup {api_group}, got {kind!r}",
            )
            continue
        if kind == "UpstreamTrafficSetting":
            refuse_upstream_traffic_setting(checker, item.line, item_where, meta.namespace, name)
            continue
        if name is None:
            continue
        named = True
        group = groups.get((meta.namespace, name))
        if group is None:
            checker.error(
                item.line_of("name"),
                f"{item_where}: HTTPRouteGroup {meta.namespace}/{name} "
                "does not exist in this policy",
            )
            continue
        rules.extend(
            Rule(
                name=f"{name}/{match.name}",
                http_matches=match.match,
                origin=Origin(checker.file, match.line),
            )
            for match in group
        )
    return tuple(rules) if named else None
