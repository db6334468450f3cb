"""The capture rules as text, without root: exact output for representative options,
properties over any options, and install/uninstall convergence against a model of
iptables-restore (the real thing is exercised in tests/e2e/test_iptables.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shlex
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressproxy.cli import build_parser
from egressproxy.iptables import apply
from egressproxy.iptables.rules import (
    CREATED_TABLE,
    GATEWAY,
    MULTIPORT_LIMIT,
    OUTPUT_CHAIN,
    PREROUTING_CHAIN,
    REDIRECT_CHAIN,
    SIDECAR,
    TURNED_ON_FORWARDING,
    UDP_CHAIN,
    Family,
    NetfilterState,
    Options,
    OptionsError,
    SavedTable,
    capture_problems,
    installed,
    parse_save,
    plan_install,
    plan_uninstall,
    port_groups,
    render,
    rule_target,
    saved_form,
    tables,
)
from egressproxy.settings import IPNetwork

V4 = Family.IPV4
V6 = Family.IPV6


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


# --- exact text ------------------------------------------------------------------------------

SIDECAR_UID_V4 = """\
*nat
:EGRESSPROXY_OUTPUT - [0:0]
:EGRESSPROXY_REDIRECT - [0:0]
-A EGRESSPROXY_OUTPUT -m owner --uid-owner 2102 -m comment --comment "egressproxy: proxy uid 2102 goes direct" -j RETURN
-A EGRESSPROXY_OUTPUT -d 127.0.0.0/8 -m comment --comment "egressproxy: loopback goes direct" -j RETURN
-A EGRESSPROXY_OUTPUT -o lo -m comment --comment "egressproxy: this host goes direct" -j RETURN
-A EGRESSPROXY_OUTPUT -p tcp -m comment --comment "egressproxy: all other TCP to the proxy" -j EGRESSPROXY_REDIRECT
-A EGRESSPROXY_REDIRECT -p tcp -m comment --comment "egressproxy: to the proxy on port 15001" -j REDIRECT --to-ports 15001
-I OUTPUT 1 -p tcp -m comment --comment "egressproxy: capture outbound TCP" -j EGRESSPROXY_OUTPUT
COMMIT
"""  # noqa: E501

SIDECAR_FULL_V6 = """\
*nat
:EGRESSPROXY_OUTPUT - [0:0]
:EGRESSPROXY_REDIRECT - [0:0]
-A EGRESSPROXY_OUTPUT -m owner --uid-owner 2102 -m comment --comment "egressproxy: proxy uid 2102 goes direct" -j RETURN
-A EGRESSPROXY_OUTPUT -m mark --mark 0x2a -m comment --comment "egressproxy: proxy mark 0x2a goes direct" -j RETURN
-A EGRESSPROXY_OUTPUT -d ::1/128 -m comment --comment "egressproxy: loopback goes direct" -j RETURN
-A EGRESSPROXY_OUTPUT -d fe80::/10 -m comment --comment "egressproxy: link-local goes direct" -j RETURN
-A EGRESSPROXY_OUTPUT -o lo -m comment --comment "egressproxy: this host goes direct" -j RETURN
-A EGRESSPROXY_OUTPUT -d 2001:db8::/32 -m comment --comment "egressproxy: excluded network 2001:db8::/32" -j RETURN
-A EGRESSPROXY_OUTPUT -p tcp -m multiport --dports 22,8000:8002 -m comment --comment "egressproxy: excluded ports 22,8000:8002" -j RETURN
-A EGRESSPROXY_OUTPUT -p tcp -m multiport --dports 80,443 -m comment --comment "egressproxy: included ports 80,443 to the proxy" -j EGRESSPROXY_REDIRECT
-A EGRESSPROXY_REDIRECT -p tcp -m comment --comment "egressproxy: to the proxy on port 4140" -j REDIRECT --to-ports 4140
-I OUTPUT 1 -p tcp -m comment --comment "egressproxy: capture outbound TCP" -j EGRESSPROXY_OUTPUT
COMMIT
*filter
:EGRESSPROXY_UDP - [0:0]
-A EGRESSPROXY_UDP -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "egressproxy: replies of allowed flows pass" -j RETURN
-A EGRESSPROXY_UDP -m owner --uid-owner 2102 -m comment --comment "egressproxy: proxy uid 2102 goes direct" -j RETURN
-A EGRESSPROXY_UDP -m mark --mark 0x2a -m comment --comment "egressproxy: proxy mark 0x2a goes direct" -j RETURN
-A EGRESSPROXY_UDP -d ::1/128 -m comment --comment "egressproxy: loopback goes direct" -j RETURN
-A EGRESSPROXY_UDP -o lo -m comment --comment "egressproxy: this host goes direct" -j RETURN
-A EGRESSPROXY_UDP -d 2001:db8::/32 -m comment --comment "egressproxy: excluded network 2001:db8::/32" -j RETURN
-A EGRESSPROXY_UDP -p udp -m multiport --dports 22,8000:8002 -m comment --comment "egressproxy: excluded ports 22,8000:8002" -j RETURN
-A EGRESSPROXY_UDP -p udp -m udp --dport 53 -m comment --comment "egressproxy: DNS stays open" -j RETURN
-A EGRESSPROXY_UDP -p udp -m multiport --dports 80,443 -m comment --comment "egressproxy: included ports 80,443 dropped so QUIC cannot bypass the proxy" -j DROP
-I OUTPUT 1 -p udp -m comment --comment "egressproxy: block outbound UDP" -j EGRESSPROXY_UDP
COMMIT
"""  # noqa: E501

GATEWAY_V4 = """\
*nat
:EGRESSPROXY_PREROUTING - [0:0]
:EGRESSPROXY_REDIRECT - [0:0]
-A EGRESSPROXY_PREROUTING -m addrtype --dst-type LOCAL -m comment --comment "egressproxy: this host goes direct" -j RETURN
-A EGRESSPROXY_PREROUTING -d 10.0.0.0/8 -m comment --comment "egressproxy: excluded network 10.0.0.0/8" -j RETURN
-A EGRESSPROXY_PREROUTING -p tcp -m comment --comment "egressproxy: all other TCP to the proxy" -j EGRESSPROXY_REDIRECT
-A EGRESSPROXY_REDIRECT -p tcp -m comment --comment "egressproxy: to the proxy on port 15001" -j REDIRECT --to-ports 15001
-I PREROUTING 1 -p tcp -m comment --comment "egressproxy: capture routed TCP" -j EGRESSPROXY_PREROUTING
COMMIT
*filter
:EGRESSPROXY_UDP - [0:0]
-A EGRESSPROXY_UDP -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "egressproxy: replies of allowed flows pass" -j RETURN
-A EGRESSPROXY_UDP -d 10.0.0.0/8 -m comment --comment "egressproxy: excluded network 10.0.0.0/8" -j RETURN
-A EGRESSPROXY_UDP -p udp -m udp --dport 53 -m comment --comment "egressproxy: DNS stays open" -j RETURN
-A EGRESSPROXY_UDP -p udp -m comment --comment "egressproxy: all other UDP dropped so QUIC cannot bypass the proxy" -j DROP
-I FORWARD 1 -p udp -m comment --comment "egressproxy: block routed UDP" -j EGRESSPROXY_UDP
COMMIT
"""  # noqa: E501


def test_sidecar_with_a_uid_only() -> None:
    assert render(tables(Options(proxy_uid=2102), V4)) == SIDECAR_UID_V4


def test_sidecar_with_everything_keeps_ipv6_to_ipv6() -> None:
    options = Options(
        proxy_port=4140,
        proxy_uid=2102,
        proxy_mark=42,
        exclude_ports=frozenset({22, 8000, 8001, 8002}),
        include_ports=frozenset({443, 80}),
        exclude_cidrs=(net("203.0.113.0/24"), net("2001:db8::/32")),
        block_udp=True,
    )
    assert render(tables(options, V6)) == SIDECAR_FULL_V6


def test_gateway_with_udp_blocked() -> None:
    options = Options(
        mode=GATEWAY, exclude_cidrs=(net("10.0.0.0/8"), net("fd00::/8")), block_udp=True
    )
    assert render(tables(options, V4)) == GATEWAY_V4


@pytest.mark.parametrize(("family", "everything"), [(V4, "0.0.0.0/0"), (V6, "::/0")])
def test_excluding_a_whole_family_is_written_as_iptables_save_prints_it(
    family: Family, everything: str
) -> None:
    """No `-d 0.0.0.0/0`, which iptables-save leaves out: else a second install would
    not recognise the first and rewrite the chains."""
    options = Options(proxy_uid=2102, exclude_cidrs=(net(everything),), block_udp=True)
    lines = rule_lines(render(tables(options, family)))
    for chain in (OUTPUT_CHAIN, UDP_CHAIN):
        assert (
            f'-A {chain} -m comment --comment "egressproxy: excluded network {everything}"'
            " -j RETURN"
        ) in lines


@pytest.mark.parametrize(
    ("cidr", "as_saved"),
    [
        ("::c000:200/120", "::192.0.2.0/120"),
        ("::ffff:c000:200/120", "::ffff:192.0.2.0/120"),
        ("::1/128", "::1/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("198.51.100.0/24", "198.51.100.0/24"),
    ],
)
def test_an_excluded_network_is_written_as_iptables_save_prints_it(
    cidr: str, as_saved: str
) -> None:
    """ip6tables-save prints an IPv4-compatible or IPv4-mapped address with a dotted quad,
    Python without: written as Python does, a second install rewrote the chains."""
    assert saved_form(net(cidr)) == as_saved


def test_uninstall_of_a_fresh_install() -> None:
    as_saved = SIDECAR_UID_V4.replace("-I OUTPUT 1 ", "-A OUTPUT ")  # as iptables-save prints it
    state = NetfilterState(parse_save(as_saved), forwarding=False, tables_droppable=False)
    assert plan_uninstall(state).restore == (
        "*nat\n"
        '-D OUTPUT -p tcp -m comment --comment "egressproxy: capture outbound TCP"'
        " -j EGRESSPROXY_OUTPUT\n"
        "-F EGRESSPROXY_OUTPUT\n"
        "-F EGRESSPROXY_REDIRECT\n"
        "-X EGRESSPROXY_OUTPUT\n"
        "-X EGRESSPROXY_REDIRECT\n"
        "COMMIT\n"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (Options(), "sidecar mode needs --proxy-uid or --proxy-mark"),
        (Options(mode=GATEWAY, proxy_uid=2102), "--proxy-uid and --proxy-mark are for sidecar"),
        (Options(mode="router", proxy_uid=1), "--mode 'router': must be sidecar or gateway"),
        (Options(proxy_uid=1, proxy_port=0), "--proxy-port: port 0 is outside 1-65535"),
        (Options(proxy_mark=2**32), "--proxy-mark 4294967296 is outside 1-4294967295"),
        (
            Options(
                proxy_uid=1, exclude_ports=frozenset({80, 443}), include_ports=frozenset({443})
            ),
            "ports 443 are both in --exclude-ports and --include-ports",
        ),
    ],
)
def test_options_that_cannot_work_are_refused(options: Options, message: str) -> None:
    with pytest.raises(OptionsError, match="^" + message.replace("(", r"\(")):
        tables(options, V4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (Options(proxy_mark=0), "--proxy-mark 0 is outside 1-4294967295"),
        (Options(proxy_mark=2**32), "--proxy-mark 4294967296 is outside 1-4294967295"),
        (Options(proxy_uid=1, proxy_port=65536), "--proxy-port: port 65536 is outside 1-65535"),
        (
            Options(proxy_uid=1, exclude_ports=frozenset({65536})),
            "--exclude-ports: port 65536 is outside 1-65535",
        ),
    ],
    ids=["mark-0", "mark-2**32", "proxy-port-65536", "excluded-port-65536"],
)
def test_a_value_just_past_its_range_is_refused(options: Options, message: str) -> None:
    """A mark 0 RETURN (`-m mark --mark 0x0`) matches every unmarked packet, so nothing
    the application sends would reach the proxy; a port of 65536 is none iptables takes,
    refused here in one line rather than by iptables-restore."""
    with pytest.raises(OptionsError, match="^" + message):
        tables(options, V4)


@pytest.mark.parametrize(
    "options",
    [Options(proxy_mark=1), Options(proxy_mark=2**32 - 1), Options(proxy_uid=1, proxy_port=65535)],
    ids=["mark-1", "mark-2**32-1", "proxy-port-65535"],
)
def test_a_value_at_the_edge_of_its_range_is_taken(options: Options) -> None:
    """The bounds are inclusive: the lowest and highest mark and port are real ones."""
    assert "REDIRECT" in render(tables(options, V4))


@pytest.mark.parametrize(
    ("ports", "groups"),
    [
        ([], ()),
        ([22, 25, 26, 27, 33], ("22,25:27,33",)),
        ([443, 80, 80], ("80,443",)),
        (range(1, 16, 2), ("1,3,5,7,9,11,13,15",)),
        (range(1, 32, 2), ("1,3,5,7,9,11,13,15,17,19,21,23,25,27,29", "31")),
        ([*range(1, 29, 2), 40, 41], ("1,3,5,7,9,11,13,15,17,19,21,23,25,27", "40:41")),
    ],
)
def test_port_groups(ports: Iterable[int], groups: tuple[str, ...]) -> None:
    assert port_groups(ports) == groups


def test_parse_save_finds_only_real_jumps_into_own_chains() -> None:
    saved = parse_save(
        "# Generated by iptables-save\n"
        "*nat\n"
        ":OUTPUT ACCEPT [7:420]\n"
        ":EGRESSPROXY_OUTPUT - [0:0]\n"
        ":KUBE-SERVICES - [0:0]\n"
        '-A OUTPUT -m comment --comment "mentions -j EGRESSPROXY_OUTPUT" -j KUBE-SERVICES\n'
        '-A OUTPUT -p tcp -m comment --comment "egressproxy: capture outbound TCP"'
        " -j EGRESSPROXY_OUTPUT\n"
        "-A EGRESSPROXY_OUTPUT -j RETURN\n"
        "COMMIT\n"
        "# Completed\n"
    )
    nat = saved["nat"]
    assert nat.own_chains() == ("EGRESSPROXY_OUTPUT",)
    assert nat.own_rules() == ("-A EGRESSPROXY_OUTPUT -j RETURN",)
    assert [rule_target(line) for line in nat.own_jumps()] == ["EGRESSPROXY_OUTPUT"]
    assert not nat.is_empty()
    assert installed(saved).splitlines() == [
        "*nat",
        ":EGRESSPROXY_OUTPUT - [0:0]",
        nat.rules[1],
        nat.rules[2],
        "COMMIT",
    ]


# --- properties of any options ---------------------------------------------------------------

port_sets = st.frozensets(st.integers(1, 65535), max_size=40)
networks_v4 = st.builds(
    lambda address, prefix: ipaddress.IPv4Network((address, prefix), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
networks_v6 = st.builds(
    lambda address, prefix: ipaddress.IPv6Network((address, prefix), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)


@st.composite
def any_options(draw: st.DrawFn) -> Options:
    mode = draw(st.sampled_from([SIDECAR, GATEWAY]))
    uid = mark = None
    if mode == SIDECAR:
        uid, mark = draw(
            st.one_of(
                st.tuples(st.integers(0, 2**32 - 2), st.none()),
                st.tuples(st.none(), st.integers(1, 2**32 - 1)),
                st.tuples(st.integers(0, 2**32 - 2), st.integers(1, 2**32 - 1)),
            )
        )
    excluded = draw(port_sets)
    included = draw(port_sets) - excluded
    cidrs = draw(st.lists(st.one_of(networks_v4, networks_v6), max_size=6))
    return Options(
        mode=mode,
        proxy_port=draw(st.integers(1, 65535)),
        proxy_uid=uid,
        proxy_mark=mark,
        exclude_ports=excluded,
        include_ports=included,
        exclude_cidrs=tuple(cidrs),
        block_udp=draw(st.booleans()),
    )


def rule_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("-A ", "-I "))]


def chain_lines(text: str, chain: str) -> list[str]:
    return [line for line in rule_lines(text) if line.split()[1] == chain]


def first_index(lines: list[str], needle: str) -> int:
    return next(index for index, line in enumerate(lines) if needle in line)


def destination(line: str, family: Family) -> IPNetwork:
    """The rule's `-d`; without one, every address of the family."""
    tokens = shlex.split(line)
    if "-d" not in tokens:
        return net("0.0.0.0/0" if family is V4 else "::/0")
    return net(tokens[tokens.index("-d") + 1])


def dports(line: str) -> set[int]:
    tokens = shlex.split(line)
    if "--dports" not in tokens:
        return set()
    ports: set[int] = set()
    for item in tokens[tokens.index("--dports") + 1].split(","):
        low, _, high = item.partition(":")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


@given(any_options(), st.sampled_from(list(Family)))
def test_every_rule_has_a_comment(options: Options, family: Family) -> None:
    for line in rule_lines(render(tables(options, family))):
        assert ' -m comment --comment "egressproxy: ' in line


@given(any_options(), st.sampled_from(list(Family)))
def test_nothing_is_redirected_before_the_proxy_and_the_exclusions_return(
    options: Options, family: Family
) -> None:
    text = render(tables(options, family))
    capture = OUTPUT_CHAIN if options.mode == SIDECAR else PREROUTING_CHAIN
    lines = chain_lines(text, capture)
    first_capture = first_index(lines, f"-j {REDIRECT_CHAIN}")
    before = lines[:first_capture]
    assert all(line.endswith("-j RETURN") for line in before)
    assert all(line.endswith(f"-j {REDIRECT_CHAIN}") for line in lines[first_capture:])
    if options.proxy_uid is not None:
        assert lines[0].startswith(f"-A {capture} -m owner --uid-owner {options.proxy_uid} ")
    if options.proxy_mark is not None:
        assert any(f"-m mark --mark {options.proxy_mark:#x} " in line for line in lines[:2])
    assert set().union(*(dports(line) for line in before)) == options.exclude_ports
    excluded = {network for network in options.exclude_cidrs if network.version == family.value}
    assert {destination(line, family) for line in before if " excluded network " in line} == (
        excluded
    )
    taken = set().union(*(dports(line) for line in lines[first_capture:]))
    assert taken == options.include_ports
    assert "REDIRECT --to-ports" not in "\n".join(lines)
    assert chain_lines(text, REDIRECT_CHAIN) == [
        f"-A {REDIRECT_CHAIN} -p tcp -m comment --comment"
        f' "egressproxy: to the proxy on port {options.proxy_port}"'
        f" -j REDIRECT --to-ports {options.proxy_port}"
    ]


@given(any_options(), st.sampled_from(list(Family)))
def test_udp_blocking_keeps_dns_and_what_is_left_alone(options: Options, family: Family) -> None:
    text = render(tables(options, family))
    lines = chain_lines(text, UDP_CHAIN)
    assert bool(lines) == options.block_udp
    if not lines:
        return
    first_drop = first_index(lines, "-j DROP")
    assert all(line.endswith("-j RETURN") for line in lines[:first_drop])
    assert all(line.endswith("-j DROP") for line in lines[first_drop:])
    assert any("--dport 53 " in line for line in lines[:first_drop])
    assert "--ctstate RELATED,ESTABLISHED " in lines[0], "replies, of a pod's UDP server too"
    if options.proxy_uid is not None:
        assert lines[1].startswith(f"-A {UDP_CHAIN} -m owner --uid-owner {options.proxy_uid} ")
    dropped = set().union(*(dports(line) for line in lines[first_drop:]))
    assert dropped == options.include_ports


@given(any_options(), st.sampled_from(list(Family)))
def test_each_family_sees_only_its_own_addresses(options: Options, family: Family) -> None:
    for line in rule_lines(render(tables(options, family))):
        tokens = shlex.split(line)
        for flag in ("-d", "-s"):
            if flag in tokens:
                assert net(tokens[tokens.index(flag) + 1]).version == family.value


@given(port_sets)
def test_port_groups_cover_the_ports_within_the_multiport_limit(ports: frozenset[int]) -> None:
    covered: set[int] = set()
    for group in port_groups(ports):
        weight = sum(2 if ":" in item else 1 for item in group.split(","))
        assert 0 < weight <= MULTIPORT_LIMIT
        covered |= dports(f"--dports {group}")
    assert covered == ports


# --- install and uninstall converge (against a model of iptables-restore --noflush) ----------

BUILTIN = {
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
}


@dataclasses.dataclass
class Model:
    """Tables as chain -> rule lines; what iptables-save would print, order kept."""

    tables: dict[str, dict[str, list[str]]]
    forwarding: bool

    def saved(self) -> dict[str, SavedTable]:
        return {
            name: SavedTable(
                tuple((chain, "ACCEPT" if chain in BUILTIN[name] else "-") for chain in chains),
                tuple(line for rules in chains.values() for line in rules),
            )
            for name, chains in self.tables.items()
        }

    def state(self, droppable: bool) -> NetfilterState:
        return NetfilterState(self.saved(), self.forwarding, droppable)

    def restore(self, text: str) -> None:
        """The semantics of `iptables-restore --noflush` the plans rely on."""
        table: dict[str, list[str]] = {}
        for line in text.splitlines():
            command, _, rest = line.partition(" ")
            if line.startswith("*"):
                table = self.tables.setdefault(line[1:], {c: [] for c in BUILTIN[line[1:]]})
            elif line.startswith(":"):
                table[line[1:].split()[0]] = []
            elif command == "-A":
                table[rest.split()[0]].append(line)
            elif command == "-I":
                chain, position, rule = rest.split(" ", 2)
                table[chain].insert(int(position) - 1, f"-A {chain} {rule}")
            elif command == "-D":
                table[rest.split()[0]].remove(f"-A {rest}")
            elif command == "-F":
                table[rest] = []
            elif command == "-X":
                assert not table[rest], f"deleting non-empty chain {rest}"
                assert not any(rule_target(r) == rest for rules in table.values() for r in rules)
                del table[rest]

    def carry_out(self, plan_text: str, drop: tuple[str, ...], forwarding: bool | None) -> None:
        self.restore(plan_text)
        if forwarding is not None:
            self.forwarding = forwarding
        saved = self.saved()
        for name in drop:
            if saved[name].is_empty():
                del self.tables[name]

    def install(self, options: Options, droppable: bool) -> bool:
        plan = plan_install(options, V4, self.state(droppable))
        self.carry_out(plan.restore, plan.drop_tables, plan.forwarding)
        return plan.changes

    def uninstall(self, droppable: bool) -> bool:
        plan = plan_uninstall(self.state(droppable))
        self.carry_out(plan.restore, plan.drop_tables, plan.forwarding)
        return plan.changes

    def copy(self) -> Model:
        tables = {
            name: {c: list(r) for c, r in chains.items()} for name, chains in self.tables.items()
        }
        return Model(tables, self.forwarding)


FOREIGN = '-A {chain} -d 192.0.2.{n}/32 -m comment --comment "not ours" -j RETURN'


@st.composite
def starting_points(draw: st.DrawFn) -> Model:
    """No tables, empty tables, or tables holding other tools' rules; forwarding either way."""
    tables: dict[str, dict[str, list[str]]] = {}
    for name in ("nat", "filter"):
        kind = draw(st.sampled_from(["absent", "empty", "foreign"]))
        if kind == "absent":
            continue
        tables[name] = {chain: [] for chain in BUILTIN[name]}
        if kind == "foreign":
            chain = draw(st.sampled_from(BUILTIN[name]))
            tables[name][chain].append(FOREIGN.format(chain=chain, n=draw(st.integers(1, 254))))
    return Model(tables, draw(st.booleans()))


@given(starting_points(), any_options(), st.booleans())
def test_install_twice_equals_install_once(start: Model, options: Options, droppable: bool) -> None:
    model = start.copy()
    assert model.install(options, droppable)
    once = model.copy()
    assert not model.install(options, droppable)
    assert model == once


@given(starting_points(), any_options())
def test_uninstall_restores_exactly_what_was_there(start: Model, options: Options) -> None:
    model = start.copy()
    model.install(options, droppable=True)
    assert model.uninstall(droppable=True)
    assert model == start
    assert not model.uninstall(droppable=True)


@given(starting_points(), any_options())
def test_uninstall_without_table_deletion_leaves_only_empty_tables(
    start: Model, options: Options
) -> None:
    model = start.copy()
    model.install(options, droppable=False)
    model.uninstall(droppable=False)
    assert model.forwarding == start.forwarding
    for name, chains in model.tables.items():
        assert chains == start.tables.get(name, {chain: [] for chain in BUILTIN[name]})


@given(starting_points(), any_options(), any_options(), st.booleans())
def test_install_over_another_install_equals_installing_it_alone(
    start: Model, first: Options, second: Options, droppable: bool
) -> None:
    layered = start.copy()
    layered.install(first, droppable)
    layered.install(second, droppable)
    alone = start.copy()
    alone.install(second, droppable)
    if droppable:
        assert layered == alone
    else:
        # iptables-legacy cannot delete a table: one the first install created stays, empty.
        assert without_empty_tables(layered) == without_empty_tables(alone)


@given(starting_points(), any_options(), st.booleans(), st.sampled_from(["nat", "filter"]))
def test_the_capture_and_the_udp_block_come_before_other_tools_rules(
    start: Model, options: Options, droppable: bool, table: str
) -> None:
    """A RETURN, ACCEPT or DNAT of another tool in front of a jump (kube-proxy's Service
    rules, ufw's, Docker's) would let what it matches past the redirect or the block."""
    options = dataclasses.replace(options, block_udp=True)
    if table == "nat":
        builtin = "OUTPUT" if options.mode == SIDECAR else "PREROUTING"
        own = OUTPUT_CHAIN if options.mode == SIDECAR else PREROUTING_CHAIN
    else:
        builtin, own = ("OUTPUT" if options.mode == SIDECAR else "FORWARD"), UDP_CHAIN
    model = start.copy()
    model.install(options, droppable)
    assert rule_target(model.tables[table][builtin][0]) == own
    model.tables[table][builtin].insert(0, FOREIGN.format(chain=builtin, n=7))
    assert model.install(options, droppable), "a rule put in front later is overtaken"
    assert rule_target(model.tables[table][builtin][0]) == own
    assert [rule_target(line) for line in model.tables[table][builtin]].count(own) == 1
    assert not model.install(options, droppable)


@given(starting_points(), any_options(), st.booleans(), st.sampled_from(["nat", "filter"]))
def test_show_tells_a_jump_overtaken_or_gone_until_install_mends_it(
    start: Model, options: Options, droppable: bool, table: str
) -> None:
    """Docker puts its FORWARD jump first on every start; a firewall reload or
    `iptables -F` drops ours and leaves the chains: capture_problems (show's exit 3) names
    the table, and after install again there is none."""
    options = dataclasses.replace(options, block_udp=True)
    if table == "nat":
        builtin = "OUTPUT" if options.mode == SIDECAR else "PREROUTING"
    else:
        builtin = "OUTPUT" if options.mode == SIDECAR else "FORWARD"
    model = start.copy()
    model.install(options, droppable)
    assert capture_problems(model.saved()) == []
    model.tables[table][builtin].insert(0, FOREIGN.format(chain=builtin, n=7))
    assert capture_problems(model.saved()) == [
        f"{table} {builtin}: "
        + (f"the jump into {rule_target(model.tables[table][builtin][1])} is not first")
    ]
    del model.tables[table][builtin][:2]
    (problem,) = capture_problems(model.saved())
    assert problem.startswith(f"{table}: nothing jumps into EGRESSPROXY_")
    model.install(options, droppable)
    assert capture_problems(model.saved()) == []


def without_empty_tables(model: Model) -> Model:
    saved = model.saved()
    kept = {name: chains for name, chains in model.tables.items() if not saved[name].is_empty()}
    return Model(kept, model.forwarding)


def test_receipts_are_kept_in_the_jump_comment() -> None:
    model = Model({}, forwarding=False)
    model.install(Options(mode=GATEWAY, block_udp=True), droppable=True)
    jumps = [line for line in model.saved()["nat"].own_jumps()]
    assert jumps == [
        '-A PREROUTING -p tcp -m comment --comment "egressproxy: capture routed TCP;'
        f' {CREATED_TABLE}; {TURNED_ON_FORWARDING}" -j EGRESSPROXY_PREROUTING'
    ]
    assert model.forwarding
    model.uninstall(droppable=True)
    assert model == Model({}, forwarding=False)


@pytest.mark.parametrize("droppable", [True, False])
@pytest.mark.parametrize("flushed", ["the jumps", "every chain"])
def test_receipts_outlive_a_flush_that_install_mends(droppable: bool, flushed: str) -> None:
    """`iptables -F PREROUTING` (a firewall reload) drops our jumps and leaves the chains,
    `iptables -t nat -F` empties our chains too; the README says to install again. The
    receipts went with the jump, then with the rules, so the next uninstall left
    forwarding on, the gateway routing past the proxy, and the table it had made."""
    model = Model({}, forwarding=False)
    options = Options(mode=GATEWAY, block_udp=True)
    model.install(options, droppable)
    for table, builtin in (("nat", "PREROUTING"), ("filter", "FORWARD")):
        chains = model.tables[table]
        for rules in chains.values() if flushed == "every chain" else [chains[builtin]]:
            rules.clear()
    model.install(options, droppable)
    assert capture_problems(model.saved()) == []
    assert not model.install(options, droppable), "a second install changes nothing"
    model.uninstall(droppable)
    expected = Model({}, forwarding=False)
    if not droppable:  # iptables-legacy cannot delete a table: only its rules go
        expected = without_empty_tables(expected)
        model = without_empty_tables(model)
    assert model == expected


# --- the runner's parts that need no root ----------------------------------------------------


def test_dry_run_prints_both_families_and_changes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert apply.main("install", Options(proxy_uid=2102), dry_run=True) == 0
    out = capsys.readouterr().out
    v4, v6 = out.split("# ip6tables-restore --noflush\n")
    assert v4 == "# iptables-restore --noflush\n" + SIDECAR_UID_V4
    assert "-d ::1/128 " in v6


def test_dry_run_of_a_gateway_install_says_it_turns_forwarding_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Install's plan turns each family's forwarding on where it is off: the dry run,
    which reads nothing, says so after each family's text, as uninstall's says it
    turns it off."""
    assert apply.main("install", Options(mode=GATEWAY), dry_run=True) == 0
    v4, v6 = capsys.readouterr().out.split("# ip6tables-restore --noflush\n")
    assert v4.endswith(
        "COMMIT\n# then /proc/sys/net/ipv4/ip_forward = 1 if it is 0"
        " (gateway mode routes the rest)\n"
    )
    assert v6.endswith(
        "COMMIT\n# then /proc/sys/net/ipv6/conf/all/forwarding = 1 if it is 0"
        " (gateway mode routes the rest)\n"
    )
    assert apply.main("install", Options(proxy_uid=2102), dry_run=True) == 0
    assert "forward" not in capsys.readouterr().out


def test_dry_run_of_uninstall_prints_what_is_installed_and_its_receipts() -> None:
    model = Model({"filter": {chain: [] for chain in BUILTIN["filter"]}}, forwarding=False)
    model.install(Options(mode=GATEWAY, block_udp=True), droppable=True)
    plan = plan_uninstall(model.state(droppable=True))
    text = apply.removal_text(V4, "iptables-nft-restore", plan)
    assert text == (
        f"# iptables-nft-restore --noflush\n{plan.restore}"
        "# then /proc/sys/net/ipv4/ip_forward = 0 (install turned it on)\n"
        "# then the IPv4 nftables table nat is deleted if left empty (install created it)\n"
    )
    assert "-D FORWARD -p udp " in plan.restore
    assert "-X EGRESSPROXY_PREROUTING\n" in plan.restore
    model.uninstall(droppable=True)
    assert apply.removal_text(V4, "iptables-nft-restore", plan_uninstall(model.state(True))) == ""


def test_returning_root_is_warned(capsys: pytest.CaptureFixture[str]) -> None:
    assert apply.main("install", Options(proxy_uid=0), dry_run=True) == 0
    assert capsys.readouterr().err == f"egressproxy iptables install: {apply.ROOT_RETURNED}\n"
    assert apply.main("install", Options(proxy_uid=2102), dry_run=True) == 0
    assert capsys.readouterr().err == ""


def test_wrong_options_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert apply.main("install", Options(), dry_run=False) == 2
    assert capsys.readouterr().err == (
        "egressproxy iptables install: sidecar mode needs --proxy-uid or --proxy-mark: without"
        " one the proxy's own connections would be redirected back to the proxy\n"
    )


def test_port_lists_take_ranges_as_linkerd_does() -> None:
    parser = build_parser()
    args = ["iptables", "install", "--proxy-uid=1", "--exclude-ports=22,8000-8002,8001"]
    assert parser.parse_args(args).exclude_ports == frozenset({22, 8000, 8001, 8002})
    assert parser.parse_args(["run", "--opaque-ports=6000-6001"]).opaque_ports == frozenset(
        {6000, 6001}
    )


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ("8001-8000", "'8001-8000': the range ends before it starts"),
        ("80-", "'' is not a port number"),
        ("1-70000", "port 70000 is outside 1-65535"),
    ],
)
def test_a_wrong_port_range_is_one_line(
    ports: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["iptables", "install", "--proxy-uid=1", f"--include-ports={ports}"]
        )
    assert f"argument --include-ports: {message}" in capsys.readouterr().err


def test_a_network_with_a_zone_is_refused_before_any_rule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ip6tables refuses `fe80::%eth0/64`, after the IPv4 rules were committed: the install
    failed half done, and --dry-run took it."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["iptables", "install", "--proxy-uid=1", "--exclude-cidrs=fe80::%eth0/64"]
        )
    assert (
        "argument --exclude-cidrs: 'fe80::%eth0/64' has a zone: a network is written without one"
        in capsys.readouterr().err
    )


def test_an_ipv4_mapped_network_is_excluded_as_ipv4() -> None:
    """IPv4 traffic, a dual-stack socket's included, meets only the IPv4 rules: as an IPv6
    rule `::ffff:192.0.2.0/120` excluded nothing, and iptables-save's spelling of it
    (`::ffff:192.0.2.0/120`) differed from the comment's, so no install was ever found
    already done."""
    args = ["iptables", "install", "--proxy-uid=1", "--exclude-cidrs=::ffff:192.0.2.0/120,::/0"]
    excluded = build_parser().parse_args(args).exclude_cidrs
    assert excluded == (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("::/0"))
    options = Options(proxy_uid=1, exclude_cidrs=excluded)
    text = {family: render(tables(options, family)) for family in (V4, V6)}
    assert "-d 192.0.2.0/24" in text[V4]
    assert "192.0.2" not in text[V6] and "ffff" not in text[V6]


@pytest.mark.parametrize(
    ("addresses", "default_route", "used"),
    [
        ([("::1", "lo"), ("fe80::1", "eth0")], False, []),
        ([("fe80::1", "eth0")], True, ["a default route"]),
        (
            [("2001:db8::5", "eth0"), ("fd00::5", "eth1")],
            False,
            ["2001:db8::5 on eth0", "fd00::5 on eth1"],
        ),
    ],
)
def test_ipv6_is_in_use_past_loopback_and_link_local(
    addresses: list[tuple[str, str]], default_route: bool, used: list[str]
) -> None:
    assert apply.ipv6_in_use(addresses, default_route) == used


def test_uncaptured_ipv6_names_the_gap_and_every_way_out() -> None:
    warning = apply.uncaptured_ipv6("ip6tables-nft-save failed: x", ["fd00::5 on eth1"])
    assert warning.startswith("WARNING: IPv6 is NOT captured (ip6tables-nft-save failed: x)")
    assert "(fd00::5 on eth1): its IPv6 connections bypass the proxy" in warning
    for way_out in ("Install ip6tables", "disable_ipv6=1", "--no-ipv6", "--ipv6 makes it"):
        assert way_out in warning


def test_a_missing_binary_names_the_package() -> None:
    with pytest.raises(apply.ApplyError, match=r"^ip6tables-nosuch-restore not found: install the"):
        apply.run_tool("ip6tables-nosuch-restore")


def test_backend_binaries() -> None:
    assert apply.Backend("nft").tool(V6, "restore") == "ip6tables-nft-restore"
    assert apply.Backend("").tool(V4, "save") == "iptables-save"
    assert apply.Backend("legacy").name == "iptables-legacy"
