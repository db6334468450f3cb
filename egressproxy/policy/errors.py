"""Where a policy went wrong: every problem carries FILE:LINE, and all of them are reported.

The YAML tree types (YMap, YList) remember the line of every key and item so
the dialect readers can point at the exact field; Checker collects problems
instead of raising at the first one, so a user fixes a file in one pass.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any, TypeVar

from egressproxy.policy.decision import is_ip_literal
from egressproxy.policy.regex import Pattern, RegexError
from egressproxy.settings import IPNetwork, unmapped_network

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    """None when the whole file is at fault (it cannot be read): there is no line to name."""
    reason: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.reason}"
        return f"{self.file}:{self.line}: {self.reason}"


class PolicyError(Exception):
    """A policy file that cannot be used; str() is one `FILE:LINE: reason` (or
    `FILE: reason`) per line."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)


class YMap(dict[str, Any]):
    """A YAML mapping that knows its own line and the line of each key."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[str, int] = {}

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class YList(list[Any]):
    """A YAML sequence that knows its own line and the line of each item."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if index < len(self.item_lines) else self.line


T = TypeVar("T")

TYPE_NAMES: dict[type, str] = {
    YMap: "a mapping",
    YList: "a list",
    str: "a string",
    int: "an integer",
    bool: "true or false",
}


def describe_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, YMap):
        return "a mapping"
    if isinstance(value, YList):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


class Checker:
    """Reads fields out of a YAML tree, recording a Problem for each thing that is wrong."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def error(self, line: int, reason: str) -> None:
        self.problems.append(Problem(self.file, line, reason))

    def known_fields(self, node: YMap, where: str, allowed: Collection[str]) -> None:
        for key in node:
            if key not in allowed:
                self.error(node.line_of(key), f"{where}: unknown field {key!r}")

    def typed(self, value: object, expected: type[T], line: int, where: str) -> T | None:
        """value if it has the expected type (bool is not an int), else a problem and None."""
        if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            return value
        problem = f"{where}: expected {TYPE_NAMES[expected]}, got {describe_value(value)}"
        if expected is str and isinstance(value, bool):
            problem += " (YAML reads yes, no, on, off, true and false unquoted as one: quote it)"
        self.error(line, problem)
        return None

    def get(
        self, node: YMap, key: str, expected: type[T], where: str, *, required: bool = False
    ) -> T | None:
        if key not in node or node[key] is None:
            if required:  # at the key when it is there with no value
                self.error(node.line_of(key), f"{where}: missing required field {key!r}")
            return None
        return self.typed(node[key], expected, node.line_of(key), f"{where}.{key}")

    def items(self, node: YMap, key: str, where: str) -> list[tuple[int, int, object]]:
        """(index, line, value) for each item of an optional list field."""
        sequence = self.get(node, key, YList, where)
        if sequence is None:
            return []
        return [(index, sequence.line_of(index), item) for index, item in enumerate(sequence)]

    def mappings(self, node: YMap, key: str, where: str) -> list[tuple[str, YMap]]:
        """(where, mapping) for each item of an optional list of mappings."""
        found = []
        for index, line, item in self.items(node, key, where):
            item_where = f"{where}.{key}[{index}]"
            mapping = self.typed(item, YMap, line, item_where)
            if mapping is not None:
                found.append((item_where, mapping))
        return found

    def strings(self, node: YMap, key: str, where: str) -> list[tuple[int, str]]:
        """(line, text) for each item of an optional list of strings."""
        found = []
        for index, line, item in self.items(node, key, where):
            text = self.typed(item, str, line, f"{where}.{key}[{index}]")
            if text is not None:
                found.append((line, text))
        return found

    def choice(self, node: YMap, key: str, where: str, choices: Sequence[str], default: str) -> str:
        value = self.get(node, key, str, where)
        if value is None:
            return default
        if value not in choices:
            self.error(
                node.line_of(key),
                f"{where}.{key}: {value!r} is not one of {', '.join(choices)}",
            )
            return default
        return value

    def port(self, node: YMap, key: str, where: str, *, required: bool = False) -> int | None:
        if node.get(key) is None:
            self.get(node, key, int, where, required=required)
            return None
        return self.port_value(node[key], node.line_of(key), f"{where}.{key}")

    def port_value(self, value: object, line: int, where: str) -> int | None:
        number = self.typed(value, int, line, where)
        if number is not None and not 0 < number < 65536:
            self.error(line, f"{where}: port {number} is outside 1-65535")
            return None
        return number

    def network(self, text: str, line: int, where: str) -> IPNetwork | None:
        """A CIDR (or a bare address, meaning /32 or /128); host bits set are allowed."""
        try:
            return unmapped_network(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            self.error(line, f"{where}: {text!r} is not a CIDR")
            return None

    def regex(self, pattern: str, line: int, where: str) -> str | None:
        try:
            Pattern(pattern)
        except RegexError as error:
            self.error(line, f"{where}: invalid regular expression {pattern!r}: {error}")
            return None
        return pattern

    def path_regex(self, pattern: str, line: int, where: str) -> str | None:
        """A regular expression on request paths, which are matched with their escapes
        decoded: one written with `%20` or `%2F` (as OSM's Envoy, matching paths raw, would
        take it) never matches, so it is warned about."""
        if self.regex(pattern, line, where) is None:
            return None
        if PERCENT_ESCAPE.search(pattern):
            log.warning(
                "%s:%d: %s: %r has a percent-escape, but paths are matched decoded (as a "
                "server resolves them): write the character itself (a space, not %%20)",
                self.file,
                line,
                where,
                pattern,
            )
        return pattern

    def hostname(
        self, text: str, line: int, where: str, *, addresses: str | None, wildcard: bool = True
    ) -> str | None:
        """A lower-cased DNS name, optionally `*.suffix`, as Gateway API hostnames allow.

        addresses: the field that matches IP addresses, named when an IP literal is given
        (an error: it is no name, and SNI never carries one); None to take an IPv4 literal
        as a name (OSM's Envoy matches it against the Host header).
        """
        name = text.strip().lower().rstrip(".")
        if addresses is not None and is_ip_literal(name):
            self.error(
                line,
                f"{where}: {text!r} is an IP address, not a hostname: "
                f"match addresses with {addresses}",
            )
            return None
        if not is_hostname(name, wildcard=wildcard):
            self.error(
                line, f"{where}: {text!r} is not a valid hostname{hostname_hint(name, wildcard)}"
            )
            return None
        return name

    def header_name(self, name: str, line: int, where: str) -> str | None:
        """An HTTP field name is a token (RFC 9110 5.1, Gateway API's HTTPHeaderName): a name
        with a space or `:` could never match a request's header."""
        if HEADER_NAME.fullmatch(name) is None:
            self.error(
                line,
                f"{where}: {name!r} is not a header name "
                "(letters, digits and !#$%&'*+-.^_`|~ only)",
            )
            return None
        return name

    def grpc_name(self, value: str, key: str, line: int, where: str) -> str | None:
        """An exact gRPC service (`pkg.Service`) or method, as Gateway API's GRPCMethodMatch
        admits them: protobuf names, so never one with a space or `/`, which no
        `/service/method` path could carry."""
        if GRPC_NAMES[key].fullmatch(value) is None:
            kind = "a protobuf service name (pkg.Service)" if key == "service" else "a method name"
            self.error(line, f"{where}.{key}: {value!r} is not {kind}")
            return None
        if value.startswith("."):  # protobuf's fully-qualified form, which Gateway API admits
            self.error(
                line,
                f"{where}.{key}: {value!r} matches no call a gRPC client makes: its path "
                f"names the service without the leading dot (write {value[1:]!r})",
            )
            return None
        return value


DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
"""An RFC 1123 label, as Kubernetes names namespaces: one spelled otherwise (`Payments`) is
no namespace, and a resource in it would silently apply to no client."""
DNS_SUBDOMAIN = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")
"""An RFC 1123 subdomain (at most 253 characters), as Kubernetes names most objects."""
PERCENT_ESCAPE = re.compile(r"(?<!\\)%[0-9A-Fa-f]{2}")
PORT_DIGITS = re.compile(r"[0-9]{1,5}")
"""ASCII digits, at most five: int() would take `1_5001`, ` 80` and other scripts' digits
(`٣`), which no other tool reading the same text (iptables, a manifest) would, and int() of
thousands of digits raises."""
HOST_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
GRPC_NAMES = {
    "service": re.compile(r"\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*", re.IGNORECASE | re.ASCII),
    "method": re.compile(r"[A-Za-z_][A-Za-z_0-9]*"),
}
"""Gateway API's GRPCMethodMatch patterns for Exact values (ASCII: case folding would take
the Kelvin sign for a K)."""


def is_hostname(name: str, *, wildcard: bool) -> bool:
    labels = name[2:] if wildcard and name.startswith("*.") else name
    return bool(labels) and all(HOST_LABEL.fullmatch(label) for label in labels.split("."))


def hostname_hint(name: str, wildcard: bool) -> str:
    """What an invalid hostname was probably meant to be: its IDNA form, the name without
    a port (which SNI never carries and a port field matches), or a leading wildcard."""
    if not name.isascii():
        try:
            ascii_name = name.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return ""
        if not is_hostname(ascii_name, wildcard=wildcard):
            return ""
        return f" (an internationalised name: write its IDNA form {ascii_name!r})"
    bare, colon, port = name.rpartition(":")
    if colon and PORT_DIGITS.fullmatch(port) and is_hostname(bare, wildcard=wildcard):
        return f" (a hostname carries no port: write {bare!r} and match the port on its own)"
    if "*" in name:
        if not wildcard:
            return " (no wildcard here: name one host)"
        return " (a wildcard is only a whole first label, as in '*.example.com')"
    return ""


@dataclass(frozen=True)
class ObjectMeta:
    """The parts of Kubernetes metadata the policy interprets."""

    namespace: str
    name: str
    annotations: dict[str, str]
    created: datetime | None
    line: int
    annotation_lines: dict[str, int]

    def annotation_line(self, key: str) -> int:
        """Where annotation key is written: its errors point there, not at the document."""
        return self.annotation_lines.get(key, self.line)


OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "namespace",
        "labels",
        "annotations",
        "creationTimestamp",
        "uid",
        "resourceVersion",
        "generation",
        "generateName",
        "managedFields",
        "finalizers",
        "ownerReferences",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
    }
)


def read_object_meta(
    checker: Checker, document: YMap, kind: str, *, namespaced: bool = True
) -> ObjectMeta | None:
    """metadata of a used kind; namespace defaults to `default` as kubectl would apply it."""
    where = f"{kind}.metadata"
    meta = checker.get(document, "metadata", YMap, kind, required=True)
    if meta is None:
        return None
    checker.known_fields(meta, where, OBJECT_META_FIELDS)
    name = checker.get(meta, "name", str, where, required=True)
    if name is not None and (len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name)):
        checker.error(
            meta.line_of("name"),
            f"{where}.name: {name!r} is no object name Kubernetes accepts "
            "(lower-case letters, digits, '-' and '.', at most 253)",
        )
        name = None
    namespace = checker.get(meta, "namespace", str, where)
    if namespace and not DNS_LABEL.fullmatch(namespace):
        checker.error(
            meta.line_of("namespace"),
            f"{where}.namespace: {namespace!r} is no namespace name "
            "(lower-case letters, digits and '-', at most 63)",
        )
        return None
    namespace = namespace or ("default" if namespaced else "")
    annotations: dict[str, str] = {}
    annotation_lines: dict[str, int] = {}
    raw = checker.get(meta, "annotations", YMap, where)
    for key, value in (raw or {}).items():
        line = raw.line_of(key) if raw else meta.line
        text = checker.typed(value, str, line, f"{where}.annotations.{key}")
        if text is not None:
            annotations[key] = text
            annotation_lines[key] = line
    created = read_timestamp(checker, meta, "creationTimestamp", where)
    if name is None:
        return None
    return ObjectMeta(namespace, name, annotations, created, document.line, annotation_lines)


def read_timestamp(checker: Checker, node: YMap, key: str, where: str) -> datetime | None:
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            checker.error(node.line_of(key), f"{where}.{key}: {value!r} is not an RFC 3339 time")
            return None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime.combine(value, time.min)
    if not isinstance(value, datetime):
        checker.error(
            node.line_of(key), f"{where}.{key}: expected a time, got {describe_value(value)}"
        )
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
