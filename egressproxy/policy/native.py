"""The native dialect: one compact EgressPolicy for hosts without Kubernetes.

An EgressPolicy is a network (its `networks`, default everything outside the
cluster networks) with a default action; each rule becomes routes on its ports
(every port when none are given): `http` matches make an HTTP route, `grpc`
matches a gRPC route, and a rule with neither matches TLS by SNI and HTTP by
Host when it names hosts, or any TCP connection and HTTP request when it does
not. Rules never fix a port's protocol: the proxy keeps detecting it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from egressproxy.policy.decision import Action, RouteProtocol, RouteRef, is_ip_literal
from egressproxy.policy.errors import PORT_DIGITS, Checker, YList, YMap, read_object_meta
from egressproxy.policy.linkerd import (
    HTTP_METHODS,
    TOP_LEVEL_FIELDS,
    VERIFY_MODES,
    kind_of,
    read_annotations,
    read_cidr_entry,
)
from egressproxy.policy.model import (
    Attachment,
    CidrRange,
    GrpcMatch,
    HostBackend,
    HttpMatch,
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

GROUP = "egressproxy.io"
SUPPORTED: dict[tuple[str, str], frozenset[str]] = {
    (GROUP, "EgressPolicy"): frozenset({"v1alpha1"})
}
ACTIONS = {"allow": Action.PASS, "deny": Action.DENY, "route": Action.ROUTE}
PATH_KEYS = {"path": MatchKind.EXACT, "pathPrefix": MatchKind.PREFIX, "pathRegex": MatchKind.REGEX}
HEADER_KEYS = {"headers": MatchKind.EXACT, "headersRegex": MatchKind.REGEX}
QUERY_KEYS = {"query": MatchKind.EXACT, "queryRegex": MatchKind.REGEX}
GRPC_NAME_KEYS = {"service": "serviceRegex", "method": "methodRegex"}
"""Each gRPC name part: its exact key and its regular expression key."""


def read(
    documents: Sequence[tuple[int, YMap]], checker: Checker
) -> tuple[list[Network], list[Route]]:
    networks: list[Network] = []
    routes: list[Route] = []
    for order, document in documents:
        if kind_of(document) == (GROUP, "EgressPolicy"):
            read_policy(document, order, checker, networks, routes)
    return networks, routes


def read_policy(
    document: YMap, order: int, checker: Checker, networks: list[Network], routes: list[Route]
) -> None:
    checker.known_fields(document, "EgressPolicy", TOP_LEVEL_FIELDS)
    meta = read_object_meta(checker, document, "EgressPolicy", namespaced=False)
    if meta is None:
        return
    where = f"EgressPolicy {meta.name}.spec"
    spec = checker.get(document, "spec", YMap, where, required=True)
    if spec is None:
        return
    known_fields(
        checker, spec, where, {"default", "networks", "audit", "verifyDestination", "rules"}
    )
    reject_empty_lists(checker, spec, where, ("networks",))
    default = checker.choice(spec, "default", where, ["allow", "deny"], "deny")
    if "default" not in spec:
        checker.error(spec.line, f"{where}: missing required field 'default' (allow or deny)")
    audit, verify = read_annotations(checker, meta, where)
    audit = bool(checker.get(spec, "audit", bool, where)) or audit
    if "verifyDestination" in spec:
        verify = read_verify_mode(checker, spec, where)
    network_id = NetworkId(GROUP, "EgressPolicy", meta.namespace, meta.name)
    networks.append(
        Network(
            id=network_id,
            ranges=read_networks(checker, spec, where) if "networks" in spec else None,
            traffic_policy=TrafficPolicy.ALLOW if default == "allow" else TrafficPolicy.DENY,
            namespace_scoped=False,
            audit=audit,
            verify_destination=verify,
            created=meta.created,
            order=order,
            origin=Origin(checker.file, meta.line),
        )
    )
    names: set[str] = set()
    for index, (rule_where, node) in enumerate(checker.mappings(spec, "rules", where)):
        name = checker.get(node, "name", str, rule_where)
        if name == "":
            checker.error(node.line_of("name"), f"{rule_where}.name: must not be empty")
        name = name or f"rule-{index}"
        if name in names:
            checker.error(node.line_of("name"), f"{rule_where}: rule name {name!r} is used twice")
        names.add(name)
        routes.extend(read_rule(checker, node, rule_where, name, network_id, order, index))


def read_networks(checker: Checker, spec: YMap, where: str) -> tuple[CidrRange, ...]:
    """Each entry a CIDR string, or {cidr, except} as in an EgressNetwork."""
    ranges = []
    for index, line, item in checker.items(spec, "networks", where):
        item_where = f"{where}.networks[{index}]"
        if isinstance(item, str):
            cidr = checker.network(item, line, item_where)
            if cidr is not None:
                ranges.append(CidrRange(cidr))
            continue
        node = checker.typed(item, YMap, line, item_where)
        if node is None:
            continue
        known_fields(checker, node, item_where, {"cidr", "except"})
        if (entry := read_cidr_entry(checker, node, item_where)) is not None:
            ranges.append(entry)
    return tuple(ranges)


def read_rule(
    checker: Checker,
    node: YMap,
    where: str,
    name: str,
    network: NetworkId,
    order: int,
    rank: int,
) -> list[Route]:
    known_fields(
        checker,
        node,
        where,
        {"name", "hosts", "cidrs", "ports", "http", "grpc", "action", "to", "verifyDestination"},
    )
    reject_empty_lists(checker, node, where, ("hosts", "cidrs", "ports", "http", "grpc"))
    verify = read_verify_mode(checker, node, where) if "verifyDestination" in node else None
    hosts = tuple(
        hostname
        for line, text in checker.strings(node, "hosts", where)
        if (hostname := checker.hostname(text, line, f"{where}.hosts", addresses="cidrs"))
        is not None
    )
    cidrs = tuple(
        cidr
        for line, text in checker.strings(node, "cidrs", where)
        if (cidr := checker.network(text, line, f"{where}.cidrs")) is not None
    )
    ports: list[int | None] = []
    for index, line, item in checker.items(node, "ports", where):
        if (port := checker.port_value(item, line, f"{where}.ports[{index}]")) is not None:
            ports.append(port)
    action = ACTIONS[checker.choice(node, "action", where, list(ACTIONS), "allow")]
    backend = read_backend(checker, node, where, action)
    http = tuple(
        match
        for match_where, match_node in checker.mappings(node, "http", where)
        for match in read_http(checker, match_node, match_where)
    )
    grpc = tuple(
        read_grpc(checker, match_node, match_where)
        for match_where, match_node in checker.mappings(node, "grpc", where)
    )
    origin = Origin(checker.file, node.line)
    families: list[tuple[RouteProtocol, Rule]] = []
    if "http" in node:
        families.append((RouteProtocol.HTTP, Rule(name, http_matches=http)))
    if "grpc" in node:
        families.append((RouteProtocol.GRPC, Rule(name, grpc_matches=grpc)))
    if not families and hosts:
        families = [(RouteProtocol.TLS, Rule(name)), (RouteProtocol.HTTP, Rule(name))]
    elif not families:  # HTTP too: ranked with the HTTP rules without hosts, not after them
        families = [(RouteProtocol.TCP, Rule(name)), (RouteProtocol.HTTP, Rule(name))]
    attachments = tuple(Attachment(network, port) for port in ports or [None])
    return [
        Route(
            ref=RouteRef(GROUP, "EgressRule", network.namespace, f"{network.name}.{name}"),
            protocol=protocol,
            fixes_protocol=False,
            hostnames=hosts if protocol != RouteProtocol.TCP else (),
            rules=(
                Rule(
                    name=name,
                    http_matches=rule.http_matches,
                    grpc_matches=rule.grpc_matches,
                    cidrs=cidrs,
                    action=action,
                    backend=backend,
                    origin=origin,
                ),
            ),
            attachments=attachments,
            clients=(),
            created=None,
            order=order,
            rank=rank,
            verify_destination=verify,
            origin=origin,
        )
        for protocol, rule in families
    ]


def reject_empty_lists(checker: Checker, node: YMap, where: str, keys: Sequence[str]) -> None:
    """An empty list would read as "nothing" but the field would mean "any" (as omitted):
    `hosts: []` on an allow rule would allow every host."""
    for key in keys:
        if isinstance(node.get(key), YList) and not node[key]:
            checker.error(
                node.line_of(key), f"{where}.{key}: empty list: list at least one or omit it"
            )


def read_verify_mode(checker: Checker, node: YMap, where: str) -> str:
    """`verifyDestination`, where YAML 1.1 reads the documented `off`, unquoted, as false."""
    if node.get("verifyDestination") is False:
        return "off"
    return checker.choice(node, "verifyDestination", where, VERIFY_MODES, "off")


def known_fields(checker: Checker, node: YMap, where: str, allowed: Collection[str]) -> None:
    """Checker.known_fields, and no field without a value: YAML reads `hosts:` with its
    items commented out as null, which Kubernetes takes for an omitted field, and an
    omitted field here means "any" (an allow rule for some hosts would allow all)."""
    checker.known_fields(node, where, allowed)
    for key, value in node.items():
        if value is None and key in allowed:
            checker.error(node.line_of(key), f"{where}.{key}: no value: give one or omit it")


def read_backend(checker: Checker, node: YMap, where: str, action: Action) -> HostBackend | None:
    target = checker.get(node, "to", str, where)
    if action != Action.ROUTE:
        if target is not None:
            checker.error(node.line_of("to"), f"{where}.to: only an action: route has a target")
        return None
    if target is None:
        checker.error(node.line, f"{where}: action route needs to: HOST:PORT")
        return None
    host, _, port_text = target.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if (
        not host
        or not PORT_DIGITS.fullmatch(port_text)
        or not 0 < int(port_text) < 65536
        or bracketed != (":" in host)
        or "[" in host
    ):
        checker.error(
            node.line_of("to"), f"{where}.to: {target!r} is not HOST:PORT (IPv6: [ADDRESS]:PORT)"
        )
        return None
    if not is_ip_literal(host):
        name = checker.hostname(
            host, node.line_of("to"), f"{where}.to", addresses=None, wildcard=False
        )
        if name is None:
            return None
        host = name
    return HostBackend(host, int(port_text))


def read_http(checker: Checker, node: YMap, where: str) -> list[HttpMatch]:
    """One match per method (Gateway API matches carry a single method)."""
    known_fields(checker, node, where, {*PATH_KEYS, "methods", *HEADER_KEYS, *QUERY_KEYS})
    reject_empty_lists(checker, node, where, ("methods",))
    given = [key for key in PATH_KEYS if key in node]
    if len(given) > 1:
        checker.error(node.line, f"{where}: give only one of path, pathPrefix, pathRegex")
    path = None
    for key in given[:1]:
        value = checker.get(node, key, str, where)
        line = node.line_of(key)
        if value is None:
            continue
        if PATH_KEYS[key] == MatchKind.REGEX:
            if value == "":
                checker.error(
                    line, f"{where}.{key}: empty: no path matches it; omit it to match any"
                )
            elif checker.path_regex(value, line, f"{where}.{key}") is not None:
                path = PathMatch(MatchKind.REGEX, value)
        elif not value.startswith("/"):
            checker.error(line, f"{where}.{key}: {value!r} must start with '/'")
        else:
            path = PathMatch(PATH_KEYS[key], value)
    headers = read_value_matches(checker, node, where, HEADER_KEYS, header_names=True)
    query = read_value_matches(checker, node, where, QUERY_KEYS, header_names=False)
    methods: list[str | None] = []
    for line, method in checker.strings(node, "methods", where):
        if method.upper() not in HTTP_METHODS:
            checker.error(line, f"{where}.methods: {method!r} is not an HTTP method")
        methods.append(method.upper())
    return [
        HttpMatch(path=path, method=method, method_any_case=True, headers=headers, query=query)
        for method in (methods or [None])
    ]


def read_value_matches(
    checker: Checker, node: YMap, where: str, keys: dict[str, MatchKind], *, header_names: bool
) -> tuple[ValueMatch, ...]:
    """Each key a mapping of names to values, compared as keys says (a regular expression
    must match the whole value): the Gateway API dialect's ValueMatch, so one matcher.
    header_names: the names are header names, checked and compared in lower case."""
    found = []
    for key, kind in keys.items():
        pairs = checker.get(node, key, YMap, where)
        if pairs is not None and not pairs:
            checker.error(
                node.line_of(key), f"{where}.{key}: empty mapping: give at least one or omit it"
            )
        for name, value in (pairs or {}).items():
            line = pairs.line_of(name) if pairs is not None else node.line
            text = checker.typed(value, str, line, f"{where}.{key}.{name}")
            if header_names:
                named = checker.header_name(name, line, f"{where}.{key}") is not None
            else:
                named = name != ""
                if not named:
                    checker.error(line, f"{where}.{key}: a parameter name must not be empty")
            if text is None or not named:
                continue
            if (
                kind == MatchKind.REGEX
                and checker.regex(text, line, f"{where}.{key}.{name}") is None
            ):
                continue
            found.append(ValueMatch(name.lower() if header_names else name, kind, text))
    return tuple(found)


def read_grpc(checker: Checker, node: YMap, where: str) -> GrpcMatch:
    """A GRPCRoute method match has one type for service and method, and so has GrpcMatch:
    with a regular expression for either part, the exact other part becomes an escaped
    one, so the one matcher (and Gateway API precedence) decides both dialects alike."""
    known_fields(checker, node, where, {*GRPC_NAME_KEYS, *GRPC_NAME_KEYS.values(), *HEADER_KEYS})
    exact: dict[str, str] = {}
    patterns: dict[str, str] = {}
    for key, regex_key in GRPC_NAME_KEYS.items():
        if key in node and regex_key in node:
            checker.error(node.line, f"{where}: give only one of {key}, {regex_key}")
        value = checker.get(node, key, str, where)
        if value is not None and checker.grpc_name(value, key, node.line_of(key), where):
            exact[key] = value
        pattern = checker.get(node, regex_key, str, where)
        if pattern == "":
            checker.error(
                node.line_of(regex_key), f"{where}.{regex_key}: empty: omit it to match any"
            )
        elif (
            pattern is not None
            and checker.regex(pattern, node.line_of(regex_key), f"{where}.{regex_key}") is not None
        ):
            patterns[key] = pattern
    headers = read_value_matches(checker, node, where, HEADER_KEYS, header_names=True)
    if patterns:
        patterns |= {key: re.escape(value) for key, value in exact.items()}
    return GrpcMatch(
        service=patterns.get("service", exact.get("service")),
        method=patterns.get("method", exact.get("method")),
        kind=MatchKind.REGEX if patterns else MatchKind.EXACT,
        headers=headers,
        any_method=True,
    )
