"""Linkerd's egress resources, as pasted from its guide: EgressNetwork, Gateway API routes, Service.

Semantics follow linkerd2's policy controller: routes attach to an
EgressNetwork through parentRefs with a required port; a rule without
backendRefs, or with the EgressNetwork itself as backend, goes to the
original destination; a Service backendRef goes to NAME.NAMESPACE.svc.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from egressproxy.policy.decision import Action, RouteProtocol, RouteRef
from egressproxy.policy.errors import Checker, ObjectMeta, YList, YMap, read_object_meta
from egressproxy.policy.model import (
    Attachment,
    CidrRange,
    GrpcMatch,
    HttpMatch,
    MatchKind,
    Network,
    NetworkId,
    Origin,
    PathMatch,
    Route,
    Rule,
    ServiceBackend,
    TrafficPolicy,
    ValueMatch,
    within,
)
from egressproxy.settings import IPNetwork

log = logging.getLogger(__name__)

LINKERD_GROUP = "policy.linkerd.io"
GATEWAY_GROUP = "gateway.networking.k8s.io"
ROUTE_VERSIONS = frozenset({"v1alpha2", "v1beta1", "v1"})
ROUTE_PROTOCOLS = {
    "HTTPRoute": RouteProtocol.HTTP,
    "GRPCRoute": RouteProtocol.GRPC,
    "TLSRoute": RouteProtocol.TLS,
    "TCPRoute": RouteProtocol.TCP,
}
LINKERD_HTTP_ROUTE_VERSIONS = frozenset({"v1beta1", "v1beta2", "v1beta3"})
"""Linkerd's own HTTPRoute: Gateway API's schema, but its parentRefs' group defaults to
policy.linkerd.io."""
SUPPORTED: dict[tuple[str, str], frozenset[str]] = {
    (LINKERD_GROUP, "EgressNetwork"): frozenset({"v1alpha1"}),
    (LINKERD_GROUP, "HTTPRoute"): LINKERD_HTTP_ROUTE_VERSIONS,
    ("", "Service"): frozenset({"v1"}),
    **{(GATEWAY_GROUP, kind): ROUTE_VERSIONS for kind in ROUTE_PROTOCOLS},
}

AUDIT_ANNOTATION = "egressproxy.io/audit"
VERIFY_ANNOTATION = "egressproxy.io/verify-destination"
VERIFY_MODES = ("off", "log", "enforce")
TOP_LEVEL_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
RULE_FIELDS = {
    RouteProtocol.HTTP: frozenset({"name", "matches", "filters", "backendRefs"}),
    RouteProtocol.GRPC: frozenset({"name", "matches", "filters", "backendRefs"}),
    RouteProtocol.TLS: frozenset({"name", "backendRefs"}),
    RouteProtocol.TCP: frozenset({"name", "backendRefs"}),
}
UNSUPPORTED_RULE_FIELDS = frozenset({"timeouts", "retry", "sessionPersistence"})


def kind_of(document: YMap) -> tuple[str, str]:
    api_version = str(document.get("apiVersion", ""))
    return api_version.rpartition("/")[0], str(document.get("kind", ""))


def read(
    documents: Sequence[tuple[int, YMap]], checker: Checker
) -> tuple[list[Network], list[Route]]:
    networks = [
        network
        for order, document in documents
        if kind_of(document) == (LINKERD_GROUP, "EgressNetwork")
        if (network := read_egress_network(document, order, checker)) is not None
    ]
    service_ports = {
        key: ports
        for _, document in documents
        if kind_of(document) == ("", "Service")
        if (service := read_service(document, checker)) is not None
        for key, ports in [service]
    }
    context = RouteContext(checker, {network.id for network in networks}, service_ports)
    routes = [
        route
        for order, document in documents
        if kind_of(document)[0] == GATEWAY_GROUP
        or kind_of(document) == (LINKERD_GROUP, "HTTPRoute")
        if (route := read_route(document, order, context)) is not None
    ]
    return networks, routes


def read_egress_network(document: YMap, order: int, checker: Checker) -> Network | None:
    checker.known_fields(document, "EgressNetwork", TOP_LEVEL_FIELDS)
    meta = read_object_meta(checker, document, "EgressNetwork")
    where = f"EgressNetwork {meta.namespace}/{meta.name}" if meta else "EgressNetwork"
    spec = checker.get(document, "spec", YMap, where, required=True)
    if meta is None or spec is None:
        return None
    where += ".spec"
    checker.known_fields(spec, where, {"trafficPolicy", "networks"})
    policy = checker.get(spec, "trafficPolicy", str, where, required=True)
    traffic_policy = TrafficPolicy.ALLOW
    if policy is not None:
        if policy not in ("Allow", "Deny"):
            checker.error(
                spec.line_of("trafficPolicy"),
                f"{where}.trafficPolicy: {policy!r} is not one of Allow, Deny",
            )
        else:
            traffic_policy = TrafficPolicy(policy)
    ranges: tuple[CidrRange, ...] | None = None
    if spec.get("networks") is not None:
        ranges = tuple(read_cidr_ranges(checker, spec, where))
        if spec["networks"] == []:
            checker.error(
                spec.line_of("networks"),
                f"{where}.networks: at least one network must be specified, as Linkerd's "
                "admission webhook says (omit networks for everything outside the cluster "
                "networks)",
            )
    audit, verify = read_annotations(checker, meta, where)
    refuse_linkerd_timeouts(checker, meta, where.removesuffix(".spec"))
    if OPAQUE_PORTS_ANNOTATION in meta.annotations:
        checker.error(
            meta.annotation_line(OPAQUE_PORTS_ANNOTATION),
            f"{where.removesuffix('.spec')}: annotation {OPAQUE_PORTS_ANNOTATION} is not "
            "supported by egressproxy: list the ports in --opaque-ports (for every network)",
        )
    return Network(
        id=NetworkId(LINKERD_GROUP, "EgressNetwork", meta.namespace, meta.name),
        ranges=ranges,
        traffic_policy=traffic_policy,
        namespace_scoped=True,
        audit=audit,
        verify_destination=verify,
        created=meta.created,
        order=order,
        origin=Origin(checker.file, meta.line),
    )


def read_cidr_ranges(checker: Checker, spec: YMap, where: str) -> list[CidrRange]:
    ranges = []
    for item_where, item in checker.mappings(spec, "networks", where):
        checker.known_fields(item, item_where, {"cidr", "except"})
        if (entry := read_cidr_entry(checker, item, item_where)) is not None:
            ranges.append(entry)
    return ranges


def read_cidr_entry(checker: Checker, item: YMap, where: str) -> CidrRange | None:
    """A `{cidr, except}` entry whose fields are known; None where it is wrong. An empty
    cidr is wrong too: dropped, it left a Deny network covering nothing."""
    text = checker.get(item, "cidr", str, where, required=True)
    cidr = None if text is None else checker.network(text, item.line_of("cidr"), f"{where}.cidr")
    excepts = [
        (line, network)
        for line, excepted in checker.strings(item, "except", where)
        if (network := checker.network(excepted, line, f"{where}.except")) is not None
    ]
    return None if cidr is None else cidr_range(checker, cidr, excepts, where)


def cidr_range(
    checker: Checker, cidr: IPNetwork, excepts: Sequence[tuple[int, IPNetwork]], where: str
) -> CidrRange:
    """A networks entry, its exceptions checked as Linkerd's admission webhook checks them:
    each inside the cidr (another one excepts nothing), none covering all of it (the entry
    would cover nothing)."""
    for line, excepted in excepts:
        if within(cidr, excepted):
            checker.error(
                line,
                f"{where}.except: {excepted} covers all of cidr {cidr}: the entry covers nothing",
            )
        elif not within(excepted, cidr):
            checker.error(line, f"{where}.except: {excepted} is not inside cidr {cidr}")
    return CidrRange(cidr, tuple(excepted for _, excepted in excepts))


def read_annotations(checker: Checker, meta: ObjectMeta, where: str) -> tuple[bool, str | None]:
    """The egressproxy.io annotations: audit mode and destination verification (a network's
    or, for verification, a route's)."""
    audit_text = meta.annotations.get(AUDIT_ANNOTATION, "false")
    if audit_text not in ("true", "false"):
        checker.error(
            meta.annotation_line(AUDIT_ANNOTATION),
            f'{where}: annotation {AUDIT_ANNOTATION} must be "true" or "false"',
        )
    verify = meta.annotations.get(VERIFY_ANNOTATION)
    if verify is not None and verify not in VERIFY_MODES:
        checker.error(
            meta.annotation_line(VERIFY_ANNOTATION),
            f"{where}: annotation {VERIFY_ANNOTATION} must be one of {', '.join(VERIFY_MODES)}",
        )
        verify = None
    return audit_text == "true", verify


OPAQUE_PORTS_ANNOTATION = "config.linkerd.io/opaque-ports"
"""On an EgressNetwork, Linkerd's ports of its traffic that are never protocol-detected."""
LINKERD_TIMEOUT_ANNOTATIONS = {
    "timeout.linkerd.io/request": "timeouts",
    "timeout.linkerd.io/response": "timeouts",
    "timeout.linkerd.io/idle": "timeouts",
    "retry.linkerd.io/limit": "retries",
    "retry.linkerd.io/timeout": "retries",
    "retry.linkerd.io/http": "retries",
    "retry.linkerd.io/grpc": "retries",
}
"""The annotations with which Linkerd's policy controller gives an EgressNetwork's or a
route's traffic timeouts and retries."""


def refuse_linkerd_timeouts(checker: Checker, meta: ObjectMeta, where: str) -> None:
    """Linkerd's timeout and retry annotations are errors, as rule `timeouts` and `retry`
    are: ignored, a request Linkerd would cut off or retry would silently be neither."""
    for key in sorted(meta.annotations):
        feature = LINKERD_TIMEOUT_ANNOTATIONS.get(key)
        if feature is not None:
            checker.error(
                meta.annotation_line(key),
                f"{where}: annotation {key} is not supported by egressproxy "
                f"(Linkerd's {feature}; remove it)",
            )


def read_service(document: YMap, checker: Checker) -> tuple[tuple[str, str], frozenset[int]] | None:
    """Only a Service's ports matter: they validate backendRef ports."""
    meta = read_object_meta(checker, document, "Service")
    if meta is None:
        return None
    where = f"Service {meta.namespace}/{meta.name}"
    spec = checker.get(document, "spec", YMap, where)
    ports: set[int] = set()
    for item_where, item in checker.mappings(spec, "ports", f"{where}.spec") if spec else []:
        port = checker.port(item, "port", item_where, required=True)
        if port is not None:
            ports.add(port)
    return (meta.namespace, meta.name), frozenset(ports)


@dataclass
class RouteContext:
    checker: Checker
    networks: set[NetworkId]
    service_ports: dict[tuple[str, str], frozenset[int]]


def read_route(document: YMap, order: int, context: RouteContext) -> Route | None:
    checker = context.checker
    group, kind = kind_of(document)
    protocol = ROUTE_PROTOCOLS[kind]
    checker.known_fields(document, kind, TOP_LEVEL_FIELDS)
    meta = read_object_meta(checker, document, kind)
    where = f"{kind} {meta.namespace}/{meta.name}" if meta else kind
    spec = checker.get(document, "spec", YMap, where, required=True)
    if meta is None or spec is None:
        return None
    where += ".spec"
    allowed = {"parentRefs", "rules"} | ({"hostnames"} if protocol != RouteProtocol.TCP else set())
    checker.known_fields(spec, where, allowed)
    problems_before = len(checker.problems)
    attachments = read_parent_refs(context, spec, meta, where, default_group=group)
    parent_refs_broken = len(checker.problems) > problems_before
    hostnames = tuple(
        hostname
        for line, text in checker.strings(spec, "hostnames", where)
        if (
            hostname := checker.hostname(
                text, line, f"{where}.hostnames", addresses="an EgressNetwork's networks"
            )
        )
        is not None
    )
    parents = {attachment.network for attachment in attachments}
    rules = tuple(
        rule
        for index, (rule_where, rule_node) in enumerate(checker.mappings(spec, "rules", where))
        if (rule := read_rule(context, rule_node, rule_where, index, protocol, meta, parents))
        is not None
    )
    if not attachments:
        if not parent_refs_broken:  # a broken parentRef has its own error
            log.info(
                "%s:%d: skipping %s: no parentRef to an EgressNetwork",
                checker.file,
                meta.line,
                where,
            )
        return None
    written = spec.get("rules")
    rules_line = spec.line_of("rules") if "rules" in spec else document.line_of("spec")
    if not written and protocol in (RouteProtocol.TLS, RouteProtocol.TCP):
        checker.error(
            rules_line,
            f"{where}.rules: missing or empty: a {kind} needs its one rule (the Gateway API "
            "CRD requires at least one; Kubernetes would refuse the object)",
        )
    if written is None and protocol is RouteProtocol.HTTP:
        # The HTTPRoute CRD's default, which Kubernetes fills in only where rules is absent
        # or null: one rule that matches all.
        rules = (Rule(name="rules[0]", origin=Origin(checker.file, spec.line)),)
    elif not written and protocol in (RouteProtocol.HTTP, RouteProtocol.GRPC):
        why = (
            "Kubernetes fills in an HTTPRoute's default rule only where rules is absent"
            if protocol is RouteProtocol.HTTP
            else "a GRPCRoute has no default rule"
        )
        log.warning(
            "%s:%d: %s has no rules: it matches no request, as in Linkerd (%s)",
            checker.file,
            rules_line,
            where.removesuffix(".spec"),
            why,
        )
    if protocol in (RouteProtocol.TLS, RouteProtocol.TCP) and isinstance(written, YList):
        # Rules without matches: the first would take every connection, the others none.
        for index in range(1, len(written)):
            checker.error(
                written.line_of(index),
                f"{where}.rules[{index}]: a {kind} has a single rule, as Linkerd's admission "
                "webhook says (the first would take every connection)",
            )
    route_where = where.removesuffix(".spec")
    if AUDIT_ANNOTATION in meta.annotations:
        checker.error(
            meta.annotation_line(AUDIT_ANNOTATION),
            f"{route_where}: annotation {AUDIT_ANNOTATION} applies to an EgressNetwork, "
            "not a route",
        )
    _, verify = read_annotations(checker, meta, route_where)
    refuse_linkerd_timeouts(checker, meta, route_where)
    return Route(
        ref=RouteRef(group, kind, meta.namespace, meta.name),
        protocol=protocol,
        fixes_protocol=True,
        hostnames=hostnames,
        rules=rules,
        attachments=tuple(attachments),
        clients=(),
        created=meta.created,
        order=order,
        origin=Origin(checker.file, meta.line),
        verify_destination=verify,
    )


def read_parent_refs(
    context: RouteContext, spec: YMap, meta: ObjectMeta, where: str, *, default_group: str
) -> list[Attachment]:
    """default_group: the route's CRD's default for a parentRef's group (its own group)."""
    checker = context.checker
    attachments = []
    for ref_where, ref in checker.mappings(spec, "parentRefs", where):
        checker.known_fields(
            ref, ref_where, {"group", "kind", "namespace", "name", "sectionName", "port"}
        )
        group = checker.get(ref, "group", str, ref_where)
        if ref.get("group") is None:  # unset: null is as absent in Kubernetes
            group = default_group
        kind = checker.get(ref, "kind", str, ref_where)
        name = checker.get(ref, "name", str, ref_where, required=True)
        namespace = checker.get(ref, "namespace", str, ref_where) or meta.namespace
        checker.get(ref, "sectionName", str, ref_where)  # checked, then ignored as in Linkerd
        if not is_egress_network(group, kind):
            if ref.get("group") is None and kind is not None and kind.lower() == "egressnetwork":
                log.warning(
                    "%s:%d: %s is not an EgressNetwork: it has no group, which Gateway API "
                    "defaults to %s (add group: %s)",
                    checker.file,
                    ref.line,
                    ref_where,
                    default_group,
                    LINKERD_GROUP,
                )
            continue
        port = checker.port(ref, "port", ref_where)
        if ref.get("port") is None:
            checker.error(
                ref.line,
                f"{ref_where}: port is required for an EgressNetwork parent (as in Linkerd)",
            )
        if name is None or port is None:
            continue
        network = NetworkId(LINKERD_GROUP, "EgressNetwork", namespace, name)
        if network not in context.networks:
            checker.error(
                ref.line_of("name"),
                f"{ref_where}: EgressNetwork {namespace}/{name} does not exist in this policy",
            )
            continue
        attachments.append(Attachment(network, port))
    return attachments


def is_egress_network(group: str | None, kind: str | None) -> bool:
    """Linkerd's test, both case-insensitive: a parentRef's group defaults to Gateway API's
    own, so one without `group: policy.linkerd.io` is no EgressNetwork."""
    return (
        group is not None
        and group.lower() == LINKERD_GROUP
        and kind is not None
        and kind.lower() == "egressnetwork"
    )


def read_rule(
    context: RouteContext,
    node: YMap,
    where: str,
    index: int,
    protocol: RouteProtocol,
    meta: ObjectMeta,
    parents: set[NetworkId],
) -> Rule | None:
    checker = context.checker
    for key in node:
        if key in UNSUPPORTED_RULE_FIELDS:
            checker.error(node.line_of(key), f"{where}: {key} is not supported by egressproxy")
    checker.known_fields(node, where, RULE_FIELDS[protocol] | UNSUPPORTED_RULE_FIELDS)
    kind_name = next(kind for kind, value in ROUTE_PROTOCOLS.items() if value == protocol)
    for filter_where, filter_node in checker.mappings(node, "filters", where):
        filter_type = filter_node.get("type")
        checker.error(
            filter_node.line_of("type"),
            f"{filter_where}: {kind_name} filter {filter_type} is not supported",
        )
    name = checker.get(node, "name", str, where) or f"rules[{index}]"
    http_matches: tuple[HttpMatch, ...] = ()
    grpc_matches: tuple[GrpcMatch, ...] = ()
    if protocol == RouteProtocol.HTTP:
        http_matches = tuple(
            read_http_match(checker, match_node, match_where)
            for match_where, match_node in checker.mappings(node, "matches", where)
        )
    elif protocol == RouteProtocol.GRPC:
        grpc_matches = tuple(
            read_grpc_match(checker, match_node, match_where)
            for match_where, match_node in checker.mappings(node, "matches", where)
        )
    backend_refs = checker.mappings(node, "backendRefs", where)
    weighing = [
        backend_where
        for backend_where, backend_node in backend_refs
        if backend_weight(checker, backend_node, backend_where) > 0
    ]
    if backend_refs and not weighing:
        checker.error(
            node.line_of("backendRefs"),
            f"{where}.backendRefs: every backendRef has weight 0: the rule forwards no "
            "traffic, which is not supported",
        )
    if len(weighing) > 1:
        checker.error(
            node.line_of("backendRefs"),
            f"{where}.backendRefs: {len(weighing)} backends: traffic splitting is not supported",
        )
    chosen = weighing[0] if weighing else None
    backend: ServiceBackend | None = None
    for backend_where, backend_node in backend_refs:
        read = read_backend_ref(context, backend_node, backend_where, kind_name, meta, parents)
        if backend_where == chosen:
            backend = read
    return Rule(
        name=name,
        http_matches=http_matches,
        grpc_matches=grpc_matches,
        action=Action.ROUTE if backend is not None else Action.PASS,
        backend=backend,
        origin=Origin(checker.file, node.line),
    )


MAX_BACKEND_WEIGHT = 1_000_000
"""The Gateway API CRDs' bound on backendRefs[].weight."""


def backend_weight(checker: Checker, node: YMap, where: str) -> int:
    """The backendRef's weight (1 when absent or out of range, which is reported). Weight 0
    forwards nothing (Gateway API), and Linkerd's proxy leaves such backends out."""
    weight = checker.get(node, "weight", int, where)
    if weight is None:
        return 1
    if not 0 <= weight <= MAX_BACKEND_WEIGHT:
        checker.error(
            node.line_of("weight"),
            f"{where}.weight: {weight} is outside 0-{MAX_BACKEND_WEIGHT}",
        )
        return 1
    return weight


def read_backend_ref(
    context: RouteContext,
    node: YMap,
    where: str,
    route_kind: str,
    meta: ObjectMeta,
    parents: set[NetworkId],
) -> ServiceBackend | None:
    """None for the parent EgressNetwork itself (original destination), else a Service."""
    checker = context.checker
    checker.known_fields(
        node, where, {"group", "kind", "name", "namespace", "port", "weight", "filters"}
    )
    for filter_where, filter_node in checker.mappings(node, "filters", where):
        checker.error(
            filter_node.line_of("type"),
            f"{filter_where}: {route_kind} filter {filter_node.get('type')} is not supported",
        )
    group = checker.get(node, "group", str, where) or ""
    kind = checker.get(node, "kind", str, where) or "Service"
    name = checker.get(node, "name", str, where, required=True)
    namespace = checker.get(node, "namespace", str, where) or meta.namespace
    port = checker.port(node, "port", where)
    if name is None:
        return None
    if is_egress_network(group, kind):
        target = NetworkId(LINKERD_GROUP, "EgressNetwork", namespace, name)
        if parents and target not in parents:
            checker.error(
                node.line_of("name"),
                f"{where}: backendRef EgressNetwork {namespace}/{name} is not this route's parent",
            )
        elif len(parents) > 1:
            others = ", ".join(sorted(f"{p.namespace}/{p.name}" for p in parents if p != target))
            checker.error(
                node.line_of("name"),
                f"{where}: backendRef EgressNetwork {namespace}/{name} serves that parent "
                f"only: Linkerd gives the route's traffic of its other parents ({others}) an "
                "invalid backend, which fails it; attach the route to one EgressNetwork",
            )
        return None
    if kind != "Service" or group not in ("", "core"):
        checker.error(node.line_of("kind"), f"{where}: backendRef kind {kind} is not supported")
        return None
    if port is None:
        if node.get("port") is None:
            checker.error(node.line, f"{where}: port is required for a Service backendRef")
        return None
    known_ports = context.service_ports.get((namespace, name))
    if known_ports is not None and port not in known_ports:
        checker.error(
            node.line_of("port"),
            f"{where}: Service {namespace}/{name} has no port {port}",
        )
    return ServiceBackend(namespace, name, port)


def read_http_match(checker: Checker, node: YMap, where: str) -> HttpMatch:
    checker.known_fields(node, where, {"path", "headers", "queryParams", "method"})
    path = None
    path_node = checker.get(node, "path", YMap, where)
    if path_node is not None:
        path_where = f"{where}.path"
        checker.known_fields(path_node, path_where, {"type", "value"})
        kind = MatchKind(
            checker.choice(
                path_node, "type", path_where, [k.value for k in MatchKind], "PathPrefix"
            )
        )
        value = checker.get(path_node, "value", str, path_where)
        if value is None:
            value = "/"
        line = path_node.line_of("value")
        if kind == MatchKind.REGEX:
            regex = checker.path_regex(value, line, path_where)  # `''` matches no path
            path = None if regex is None else PathMatch(kind, regex)
        elif refused := refused_path_value(value):
            checker.error(line, f"{path_where}.value: {value!r} {refused}")
        else:
            path = PathMatch(kind, value)
    method = checker.get(node, "method", str, where)
    if method is not None and method not in HTTP_METHODS:
        checker.error(node.line_of("method"), f"{where}.method: {method!r} is not an HTTP method")
    return HttpMatch(
        path=path,
        method=method,
        headers=read_value_matches(checker, node, "headers", where, header_names=True),
        query=read_value_matches(checker, node, "queryParams", where, header_names=False),
    )


_PATH_VALUE = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2}|[^\x00-\x7f])+")
_PATH_VALUE_SEQUENCES = ("//", "/./", "/../", "%2f", "%2F", "#")


def refused_path_value(value: str) -> str | None:
    """Why the API server refuses an Exact or PathPrefix value (HTTPPathMatch's CEL rules),
    or None. Taken as written, an empty value or one ending in `/..` widens to `/`, every
    path: a route meant to allow one path would allow them all. Text beyond ASCII, which
    the API server wants percent-encoded, is taken as its UTF-8 (`/café`), as a client
    sends it."""
    if not value:
        return "must not be empty (leave it out for '/', every path)"
    if not value.startswith("/"):
        return "must start with '/'"
    for sequence in _PATH_VALUE_SEQUENCES:
        if sequence in value:
            return f"must not contain {sequence!r}"
    for end in ("/..", "/."):
        if value.endswith(end):
            return f"must not end with {end!r}"
    if not _PATH_VALUE.fullmatch(value):
        return "has a character a path cannot hold unescaped"
    return None


def read_value_matches(
    checker: Checker, node: YMap, key: str, where: str, *, header_names: bool
) -> tuple[ValueMatch, ...]:
    """header_names: the names are header names, checked and compared in lower case.

    As Gateway API has it: the list is a map keyed by name, so the API server refuses a
    name given twice; of names equal but for case (headers), only the first counts.
    """
    matches: list[ValueMatch] = []
    names: set[str] = set()
    counted: set[str] = set()
    for item_where, item in checker.mappings(node, key, where):
        checker.known_fields(item, item_where, {"type", "name", "value"})
        kind = MatchKind(
            checker.choice(item, "type", item_where, ["Exact", "RegularExpression"], "Exact")
        )
        name = checker.get(item, "name", str, item_where, required=True)
        value = checker.get(item, "value", str, item_where, required=True)
        if name is None or value is None:
            continue
        name_line = item.line_of("name")
        if header_names and checker.header_name(name, name_line, f"{item_where}.name") is None:
            continue
        if not name or not value:  # the CRD's MinLength=1: the API server refuses them
            empty = "name" if not name else "value"
            checker.error(item.line_of(empty), f"{item_where}.{empty}: must not be empty")
            continue
        if name in names:
            checker.error(name_line, f"{item_where}.name: {name!r} is given twice in {key}")
            continue
        names.add(name)
        if (
            kind == MatchKind.REGEX
            and checker.regex(value, item.line_of("value"), item_where) is None
        ):
            continue
        compared = name.lower() if header_names else name
        if compared in counted:
            log.info(
                "%s:%d: %s.name: %r is ignored: Gateway API counts only the first %s entry"
                " of a name",
                checker.file,
                name_line,
                item_where,
                name,
                key,
            )
            continue
        counted.add(compared)
        matches.append(ValueMatch(compared, kind, value))
    return tuple(matches)


def read_grpc_match(checker: Checker, node: YMap, where: str) -> GrpcMatch:
    checker.known_fields(node, where, {"method", "headers"})
    service = method = None
    method_node = checker.get(node, "method", YMap, where)
    if method_node is not None:
        method_where = f"{where}.method"
        checker.known_fields(method_node, method_where, {"type", "service", "method"})
        kind = checker.choice(
            method_node, "type", method_where, ["Exact", "RegularExpression"], "Exact"
        )
        if kind == MatchKind.REGEX.value:
            checker.error(
                method_node.line_of("type"),
                f"{method_where}.type: RegularExpression is not supported: Linkerd's policy"
                " controller refuses such a GRPCRoute (match service and method exactly)",
            )
        # GRPCMethodMatch: a service or method "left empty or omitted" matches any
        service = checker.get(method_node, "service", str, method_where) or None
        method = checker.get(method_node, "method", str, method_where) or None
        if service is None and method is None:
            checker.error(method_node.line, f"{method_where}: one of service or method is required")
        for value, key in ((service, "service"), (method, "method")):
            if value is not None:
                checker.grpc_name(value, key, method_node.line_of(key), method_where)
    return GrpcMatch(
        service=service,
        method=method,
        headers=read_value_matches(checker, node, "headers", where, header_names=True),
    )
