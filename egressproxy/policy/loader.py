"""YAML text → frozen Model, or PolicyError listing every problem with FILE:LINE.

PyYAML composes the node graph (which keeps each node's line); we build the
tree ourselves so every mapping key and list item remembers where it was
written, then hand the documents to each dialect. Any input whatsoever ends as
a Model or a PolicyError: the proxy must never die on a bad file.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import yaml

from egressproxy.policy import linkerd, native, osm
from egressproxy.policy.errors import Checker, PolicyError, Problem, YList, YMap
from egressproxy.policy.model import Model

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 16 * 1024 * 1024
"""A policy is read no further: a device such as /dev/zero, or a log given by mistake, would
otherwise fill memory. A list of 100,000 CIDRs is some 3 MiB."""
MAX_ALIAS_NODES = 200_000
"""Nodes that YAML aliases may add by repeating what is already written ("billion laughs"
expands a few lines to 9^9 nodes); the nodes written out in the file are not counted."""


def load_policy(path: Path) -> Model:
    file = str(path)
    return load_policy_text(decode_policy(read_policy(file), file), file)


def read_policy(file: str) -> bytes:
    """The file's bytes; PolicyError naming the file (no line: none was read) when it cannot
    be read (missing, a directory, permission denied) or is larger than MAX_POLICY_BYTES.
    A pipe is read as a file is (`check --policy <(kubectl get … -o yaml)`)."""
    try:
        with open(file, "rb") as policy:
            data = policy.read(MAX_POLICY_BYTES + 1)
    except OSError as error:
        reason = f"cannot read the policy: {error.strerror or error}"
        raise PolicyError([Problem(file, None, reason)]) from None
    if len(data) > MAX_POLICY_BYTES:
        reason = f"the policy is larger than {MAX_POLICY_BYTES // (1024 * 1024)} MiB"
        raise PolicyError([Problem(file, None, reason)])
    return data


def decode_policy(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise PolicyError([Problem(file, line, "the policy is not valid UTF-8")]) from None


def load_policy_text(text: str, file: str) -> Model:
    checker = Checker(file)
    documents = parse_documents(text, checker)
    if checker.problems:
        raise PolicyError(checker.problems)
    listed = expand_lists(documents, checker)
    if not listed and not checker.problems:
        # emptied or truncated by mistake, or `kubectl get … -o yaml` of none: an empty
        # List; passing everything would fail open
        empty = " (its List has no items)" if documents else ""
        reason = (
            f"the policy has no documents{empty}: to let all traffic through, say so"
            " (config/policy.yaml allows everything)"
        )
        raise PolicyError([Problem(file, 1, reason)])
    documents = listed
    recognised: list[tuple[int, YMap]] = []
    for order, document in enumerate(documents):
        kind_line = document.line_of("kind")
        api_version = checker.get(document, "apiVersion", str, "document", required=True)
        kind = checker.get(document, "kind", str, "document", required=True)
        if api_version is None or kind is None:
            continue
        group, _, version = api_version.rpartition("/")
        versions = SUPPORTED.get((group, kind))
        if versions is not None and version in versions:
            recognised.append((order, document))
        elif versions is not None:
            checker.error(
                document.line_of("apiVersion"),
                f"{kind}: apiVersion {api_version!r} is not supported "
                f"(use {', '.join(f'{group}/{v}' if group else v for v in sorted(versions))})",
            )
        elif meant := network_kind_meant(kind, group):
            checker.error(
                document.line_of("apiVersion"),
                f"{kind} of apiVersion {api_version!r} is no kind egressproxy reads (it reads "
                f"{meant}): skipped, its network would let the traffic it covers through",
            )
        else:
            log.info("%s:%d: skipping %s: no egress meaning", file, kind_line, kind)
    recognised = last_of_each_object(recognised, file)
    networks, routes = linkerd.read(recognised, checker)
    osm_networks, osm_routes = osm.read(recognised, checker)
    native_networks, native_routes = native.read(recognised, checker)
    all_networks = [*networks, *osm_networks, *native_networks]
    if checker.problems:
        raise PolicyError(sorted(checker.problems, key=lambda problem: problem.line or 0))
    return Model(
        file=file,
        networks=tuple(all_networks),
        routes=tuple([*routes, *osm_routes, *native_routes]),
    )


def last_of_each_object(documents: list[tuple[int, YMap]], file: str) -> list[tuple[int, YMap]]:
    """One document per object, as the API server holds one per group, kind, namespace and
    name: a later one takes an earlier one's place, with a warning. `kubectl apply` of a
    file, or of a guide's steps one after the other (Linkerd's re-applies two routes),
    keeps the last, and the object keeps the place of its first, its age among routes."""
    places: dict[tuple[str, str, str, str], tuple[int, int]] = {}
    """Each object's place in `kept`, and the line where it was first given."""
    kept: list[tuple[int, YMap]] = []
    for order, document in documents:
        key = object_key(document)
        known = None if key is None else places.get(key)
        if key is None or known is None:
            if key is not None:
                places[key] = (len(kept), document.line)
            kept.append((order, document))
            continue
        place, first_line = known
        _, kind, namespace, name = key
        log.warning(
            "%s:%d: %s %s is given again (first at line %d): the last one is used, as "
            "kubectl apply keeps it",
            file,
            document.line,
            kind,
            f"{namespace}/{name}" if namespace else name,
            first_line,
        )
        kept[place] = (kept[place][0], document)
    return kept


def object_key(document: YMap) -> tuple[str, str, str, str] | None:
    """(group, kind, namespace, name) of an object, its namespace defaulted as the dialects
    default it; None when the document does not say them (its dialect reports that)."""
    api_version, kind = document.get("apiVersion"), document.get("kind")
    metadata = document.get("metadata")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return None
    if not isinstance(metadata, YMap) or not isinstance(name := metadata.get("name"), str):
        return None
    group = api_version.rpartition("/")[0]
    namespace = metadata.get("namespace") or ("" if group == native.GROUP else "default")
    return group, kind, str(namespace), name


SUPPORTED: dict[tuple[str, str], frozenset[str]] = {
    **linkerd.SUPPORTED,
    **osm.SUPPORTED,
    **native.SUPPORTED,
}
"""(API group, kind) → the versions we read; other kinds are skipped."""

NETWORK_KINDS = frozenset({"EgressNetwork", "MeshConfig", "EgressPolicy"})
"""The kinds that make networks: one skipped for a typo in its apiVersion or kind would
leave its traffic to no network (a Deny silently becomes a pass)."""


def network_kind_meant(kind: str, group: str) -> str | None:
    """The network kind this one spells but for case, under any group; in a network kind's
    own group, also one it misspells by a letter or two, and any kind of egressproxy's
    group, which has no other (None: none meant). Another group's kinds that look alike
    (gwin.yandex.cloud's IngressPolicy) are its own."""
    spelled = kind.lower()
    meant = [
        f"{known} of {known_group}/{version}"
        for (known_group, known), versions in SUPPORTED.items()
        if known in NETWORK_KINDS
        and (
            known.lower() == spelled
            or group == native.GROUP == known_group
            or (
                group == known_group
                and difflib.SequenceMatcher(None, known.lower(), spelled).ratio() >= NEAR_MISS
            )
        )
        for version in sorted(versions)
    ]
    return ", ".join(meant) if meant else None


NEAR_MISS = 0.84
"""How alike a kind in a network kind's group must be to it to be taken for a typo:
EgresNetwork, MeshConfg and EgressNetworks are (0.96, 0.95, 0.96); Server or
NetworkAuthentication of policy.linkerd.io (0.42, 0.41) are not."""


def parse_documents(text: str, checker: Checker) -> list[YMap]:
    """Every non-empty document as a YMap; syntax errors become problems at the YAML mark."""
    nodes = compose_documents(text, checker)
    builder = TreeBuilder(checker)
    documents = []
    for node in nodes:
        try:
            tree = builder.build(node)
        except RecursionError:
            checker.error(builder.line, "YAML nesting is too deep")
            return []
        if tree is None:
            continue
        if isinstance(tree, YMap):
            documents.append(tree)
        else:
            checker.error(node.start_mark.line + 1, "a policy document must be a mapping")
    return documents


def compose_documents(text: str, checker: Checker) -> list[yaml.Node]:
    """PyYAML's node graph of each document; [] and a problem where the YAML is broken."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as error:  # a character YAML forbids, found before parsing
        line = text[: error.position].count("\n") + 1
        checker.error(line, f"YAML: unacceptable character #x{error.character:04x}")
        return []
    nodes = []
    try:
        while loader.check_node():
            if (node := loader.get_node()) is not None:
                nodes.append(node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        checker.error(line, f"YAML syntax: {error.problem or error.context}")
        return []
    except RecursionError:
        checker.error(loader.line + 1, "YAML nesting is too deep")
        return []
    finally:
        loader.dispose()
    return nodes


def expand_lists(documents: list[YMap], checker: Checker) -> list[YMap]:
    """Each `v1` `List` (what `kubectl get A,B -o yaml` writes, and what `kubectl apply`
    takes) replaced by its items, in order: skipped as a kind of no egress meaning, the
    resources in it would silently not apply."""
    expanded: list[YMap] = []
    pending = list(reversed(documents))
    while pending:
        document = pending.pop()
        if (document.get("apiVersion"), document.get("kind")) != ("v1", "List"):
            expanded.append(document)
            continue
        checker.known_fields(document, "List", {"apiVersion", "kind", "metadata", "items"})
        items = checker.get(document, "items", YList, "List", required=True) or YList(0)
        mappings = [
            mapping
            for index, item in enumerate(items)
            if (mapping := checker.typed(item, YMap, items.line_of(index), f"List.items[{index}]"))
            is not None
        ]
        pending.extend(reversed(mappings))
    return expanded


MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_INTEGER_BITS = 64
"""No field takes more; Python will not write an integer of more than 4,300 digits."""


class TreeBuilder:
    """yaml.Node → YMap / YList / plain scalars, counting the nodes that aliases repeat
    against MAX_ALIAS_NODES."""

    def __init__(self, checker: Checker) -> None:
        self.checker = checker
        self.scalars = yaml.constructor.SafeConstructor()
        self.alias_budget = MAX_ALIAS_NODES
        self.built: set[int] = set()
        self.active: set[int] = set()
        self.line = 1
        """The line of the node last entered: where nesting too deep for Python was."""

    def build(self, node: yaml.Node, repeated: bool = False) -> object:
        """repeated: node is reached through an alias of something already built."""
        line = self.line = node.start_mark.line + 1
        repeated = repeated or id(node) in self.built
        self.built.add(id(node))
        if repeated:
            self.alias_budget -= 1
            if self.alias_budget < 0:
                if self.alias_budget == -1:
                    reason = f"YAML aliases expand the policy by more than {MAX_ALIAS_NODES} nodes"
                    self.checker.error(line, reason)
                return None
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, line)
        if id(node) in self.active:
            self.checker.error(line, "recursive YAML alias")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return self.sequence(node, line, repeated)
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, line, repeated)
        finally:
            self.active.discard(id(node))
        self.checker.error(line, "unsupported YAML node")
        return None

    def scalar(self, node: yaml.ScalarNode, line: int) -> object:
        try:
            value = self.scalars.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as error:
            self.checker.error(line, f"YAML value {node.value!r}: {error}".splitlines()[0])
            return None
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate, written as "\ud800": no text
                self.checker.error(line, f"YAML value {node.value!r}: not valid Unicode")
                return None
        elif isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
            # YAML reads 0x… of any length; the decimal text of such a number raises
            self.checker.error(line, f"YAML value {node.value[:20]!r}…: too large a number")
            return None
        return value

    def sequence(self, node: yaml.SequenceNode, line: int, repeated: bool) -> YList:
        result = YList(line)
        for item in node.value:
            result.append(self.build(item, repeated))
            result.item_lines.append(item.start_mark.line + 1)
        return result

    def mapping(self, node: yaml.MappingNode, line: int, repeated: bool) -> YMap:
        result = YMap(line)
        merged: list[YMap] = []
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.checker.error(key_line, "a mapping key must be a plain value")
                continue
            if key_node.tag == MERGE_TAG:
                merged.extend(self.merge(value_node, key_line, repeated))
                continue
            key = self.scalar(key_node, key_line)
            text = key if isinstance(key, str) else str(key)
            if text in result:
                self.checker.error(key_line, f"duplicate key {text!r}")
                continue
            result[text] = self.build(value_node, repeated)
            result.key_lines[text] = key_line
        for source in merged:
            for text, value in source.items():
                if text not in result:
                    result[text] = value
                    result.key_lines[text] = source.line_of(text)
        return result

    def merge(self, node: yaml.Node, line: int, repeated: bool) -> list[YMap]:
        """The mappings a merge key (`<<: *base`) names, first taking precedence, as kubectl's
        YAML reads them; the mapping's own keys override them all."""
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        mappings = []
        for source in sources:
            built = self.build(source, repeated)
            if isinstance(built, YMap):
                mappings.append(built)
            elif built is not None or isinstance(source, yaml.ScalarNode):
                self.checker.error(line, "a merge key (<<) takes a mapping or a list of mappings")
        return mappings
