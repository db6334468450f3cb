"""The capture rules as `iptables-restore` text: pure functions of the options and of
what `iptables-save` printed.

Model: linkerd2-proxy-init pkg/iptables/iptables.go. Own chains (EGRESSPROXY_*)
reached by one jump from a built-in chain, a comment on every rule, the proxy's
own traffic returned before anything can redirect it. Rules are written in the
canonical form `iptables-save` prints them (addresses, interface, protocol,
matches, comment, target), so what `show` reads back is what was generated and
an unchanged install is recognised as unchanged.

Install converges: whatever an earlier install left, one restore transaction per
family makes the own chains and their jumps exactly what the options ask for.
Uninstall is the same convergence towards nothing.

Receipts. Two side effects outlive the chains: an nftables table that did not
exist before install (iptables-nft creates it, and it would stay behind, empty)
and the forwarding switch gateway mode turns on. Install notes them in the
comment of the jump it adds ("; created table", "; turned on forwarding"), of the
last rule of its chains (which outlive a lost jump), and as an empty chain named for
the receipt (which outlives `iptables -t nat -F`, a flush of every chain's rules), so
a later uninstall undoes exactly those and nothing it did not do, with no state kept
anywhere but in the rules themselves. Only a reload that deletes the chains too
(`-X`, a restore without --noflush) loses them.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import shlex
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from egressproxy.settings import MAX_MARK, PROXY_PORT, IPNetwork

SIDECAR = "sidecar"
GATEWAY = "gateway"
OWN_PREFIX = "EGRESSPROXY_"
OUTPUT_CHAIN = "EGRESSPROXY_OUTPUT"
PREROUTING_CHAIN = "EGRESSPROXY_PREROUTING"
REDIRECT_CHAIN = "EGRESSPROXY_REDIRECT"
UDP_CHAIN = "EGRESSPROXY_UDP"
COMMENT_PREFIX = "egressproxy: "
CREATED_TABLE = "created table"
TURNED_ON_FORWARDING = "turned on forwarding"
# Chain names are at most 28 characters.
RECEIPT_CHAINS = {
    CREATED_TABLE: "EGRESSPROXY_CREATED_TABLE",
    TURNED_ON_FORWARDING: "EGRESSPROXY_TURNED_ON_FWD",
}
DNS_PORT = 53
# xt_multiport takes at most 15 ports per rule, a range counting as two.
MULTIPORT_LIMIT = 15
# (uid_t)-1 means "no uid" to the kernel.
MAX_UID = 2**32 - 2


class OptionsError(ValueError):
    """Options that cannot make a working capture; the message says which and why."""


class Family(enum.Enum):
    IPV4 = 4
    IPV6 = 6

    @property
    def command(self) -> str:
        """The binaries' prefix: iptables, ip6tables."""
        return "iptables" if self is Family.IPV4 else "ip6tables"

    @property
    def loopback(self) -> IPNetwork:
        if self is Family.IPV4:
            return ipaddress.IPv4Network("127.0.0.0/8")
        return ipaddress.IPv6Network("::1/128")

    @property
    def link_local(self) -> IPNetwork | None:
        """IPv6 link-local, which REDIRECT cannot take: its scope is lost on the way to ::1,
        so the kernel drops the redirected SYN and the connection hangs. IPv4's link-local
        (a cloud's 169.254.169.254) redirects, and is captured."""
        return ipaddress.IPv6Network("fe80::/10") if self is Family.IPV6 else None

    @property
    def label(self) -> str:
        return "IPv4" if self is Family.IPV4 else "IPv6"


@dataclass(frozen=True)
class Options:
    """What `egressproxy iptables` was asked for (INTERFACE.md section 1)."""

    mode: str = SIDECAR
    proxy_port: int = PROXY_PORT
    proxy_uid: int | None = None
    proxy_mark: int | None = None
    exclude_ports: frozenset[int] = frozenset()
    include_ports: frozenset[int] = frozenset()
    exclude_cidrs: tuple[IPNetwork, ...] = ()
    ipv6: bool | None = None
    block_udp: bool = False


def validate(options: Options) -> None:
    """Refuse options whose rules would loop, do nothing, or contradict themselves."""
    if options.mode not in (SIDECAR, GATEWAY):
        raise OptionsError(f"--mode {options.mode!r}: must be {SIDECAR} or {GATEWAY}")
    ports = [("--proxy-port", options.proxy_port)]
    ports += [("--exclude-ports", port) for port in options.exclude_ports]
    ports += [("--include-ports", port) for port in options.include_ports]
    for flag, port in ports:
        if not 0 < port < 65536:
            raise OptionsError(f"{flag}: port {port} is outside 1-65535")
    identified = options.proxy_uid is not None or options.proxy_mark is not None
    if options.mode == SIDECAR and not identified:
        raise OptionsError(
            "sidecar mode needs --proxy-uid or --proxy-mark: without one the proxy's own"
            " connections would be redirected back to the proxy"
        )
    if options.mode == GATEWAY and identified:
        raise OptionsError(
            "--proxy-uid and --proxy-mark are for sidecar mode: in gateway mode the proxy's"
            " own connections leave through OUTPUT, which the gateway rules do not touch"
        )
    if options.proxy_uid is not None and not 0 <= options.proxy_uid <= MAX_UID:
        raise OptionsError(f"--proxy-uid {options.proxy_uid} is outside 0-{MAX_UID}")
    if options.proxy_mark is not None and not 0 < options.proxy_mark <= MAX_MARK:
        raise OptionsError(f"--proxy-mark {options.proxy_mark} is outside 1-{MAX_MARK}")
    both = options.exclude_ports & options.include_ports
    if both:
        listed = ",".join(str(port) for port in sorted(both))
        raise OptionsError(f"ports {listed} are both in --exclude-ports and --include-ports")


@dataclass(frozen=True)
class Rule:
    """One `-A` line; `matches` in iptables-save order, `target` with its options."""

    chain: str
    comment: str
    target: str
    matches: str = ""

    @property
    def line(self) -> str:
        head = f"-A {self.chain} {self.matches}".rstrip()
        return f'{head} -m comment --comment "{COMMENT_PREFIX}{self.comment}" -j {self.target}'


@dataclass(frozen=True)
class Table:
    """One table's share of the capture: own chains, their rules, the jump into them."""

    name: str
    chains: tuple[str, ...]
    rules: tuple[Rule, ...]
    jump: Rule
    """Inserted in front of the built-in chain's other rules: a REDIRECT or a DROP is
    worth nothing behind another tool's ACCEPT, RETURN or DNAT (ufw's, Docker's,
    kube-proxy's Service rules on a node), which ends the chain for the packet."""

    @property
    def jump_addition(self) -> str:
        """The restore line that adds the jump, first in its chain."""
        return f"-I {self.jump.chain} 1 {self.jump.line.removeprefix(f'-A {self.jump.chain} ')}"


def port_groups(ports: Iterable[int]) -> tuple[str, ...]:
    """Ports as multiport lists: ascending, neighbours merged into ranges, 15 ports a rule."""
    runs: list[tuple[int, int]] = []
    for port in sorted(set(ports)):
        if runs and runs[-1][1] == port - 1:
            runs[-1] = (runs[-1][0], port)
        else:
            runs.append((port, port))
    groups: list[list[str]] = []
    weight = 0
    for low, high in runs:
        cost = 1 if low == high else 2
        if not groups or weight + cost > MULTIPORT_LIMIT:
            groups.append([])
            weight = 0
        groups[-1].append(str(low) if low == high else f"{low}:{high}")
        weight += cost
    return tuple(",".join(group) for group in groups)


def tables(options: Options, family: Family) -> tuple[Table, ...]:
    """The capture for one address family: nat always, filter when UDP is blocked."""
    validate(options)
    if options.mode == SIDECAR:
        builtin, capture, direction = "OUTPUT", OUTPUT_CHAIN, "outbound"
        udp_builtin = "OUTPUT"
    else:
        builtin, capture, direction = "PREROUTING", PREROUTING_CHAIN, "routed"
        udp_builtin = "FORWARD"
    port = options.proxy_port
    nat = Table(
        name="nat",
        chains=(capture, REDIRECT_CHAIN),
        rules=(
            *_own_traffic(options, family, capture, nat=True),
            *_excluded(options, family, capture, "tcp"),
            *_taken(options, capture, "tcp", "to the proxy", REDIRECT_CHAIN),
            Rule(
                REDIRECT_CHAIN,
                f"to the proxy on port {port}",
                f"REDIRECT --to-ports {port}",
                "-p tcp",
            ),
        ),
        jump=Rule(builtin, f"capture {direction} TCP", capture, "-p tcp"),
    )
    if not options.block_udp:
        return (nat,)
    udp = Table(
        name="filter",
        chains=(UDP_CHAIN,),
        rules=(
            *_own_traffic(options, family, UDP_CHAIN, nat=False),
            *_excluded(options, family, UDP_CHAIN, "udp"),
            Rule(UDP_CHAIN, "DNS stays open", "RETURN", f"-p udp -m udp --dport {DNS_PORT}"),
            *_taken(options, UDP_CHAIN, "udp", "dropped so QUIC cannot bypass the proxy", "DROP"),
        ),
        jump=Rule(udp_builtin, f"block {direction} UDP", UDP_CHAIN, "-p udp"),
    )
    return (nat, udp)


def _own_traffic(options: Options, family: Family, chain: str, *, nat: bool) -> Iterator[Rule]:
    """Traffic that is not new egress of the workload: replies to flows already let
    through (routed UDP crosses FORWARD in both directions; a UDP server in a pod, DNS
    included, answers through OUTPUT), the proxy's own and this host's (sidecar),
    traffic for the gateway itself."""
    if not nat:
        yield Rule(
            chain,
            "replies of allowed flows pass",
            "RETURN",
            "-m conntrack --ctstate RELATED,ESTABLISHED",
        )
    if options.mode == SIDECAR:
        if options.proxy_uid is not None:
            uid = options.proxy_uid
            yield Rule(
                chain, f"proxy uid {uid} goes direct", "RETURN", f"-m owner --uid-owner {uid}"
            )
        if options.proxy_mark is not None:
            mark = f"{options.proxy_mark:#x}"
            yield Rule(chain, f"proxy mark {mark} goes direct", "RETURN", f"-m mark --mark {mark}")
        yield Rule(chain, "loopback goes direct", "RETURN", f"-d {family.loopback}")
        if nat and family.link_local is not None:
            yield Rule(chain, "link-local goes direct", "RETURN", f"-d {family.link_local}")
        yield Rule(chain, "this host goes direct", "RETURN", "-o lo")
    elif nat:
        yield Rule(chain, "this host goes direct", "RETURN", "-m addrtype --dst-type LOCAL")


def saved_form(network: IPNetwork) -> str:
    """network as iptables-save prints it, through the C library's inet_ntop as it does,
    so that a second install finds the first one's rules: glibc ends an IPv4-compatible
    or IPv4-mapped IPv6 address in a dotted quad (`::192.0.2.0/120`), Python does not."""
    family = socket.AF_INET6 if network.version == 6 else socket.AF_INET
    return f"{socket.inet_ntop(family, network.network_address.packed)}/{network.prefixlen}"


def _excluded(options: Options, family: Family, chain: str, protocol: str) -> Iterator[Rule]:
    for network in options.exclude_cidrs:
        if network.version == family.value:
            # iptables-save prints no `-d` for a whole family (0.0.0.0/0, ::/0).
            matches = f"-d {saved_form(network)}" if network.prefixlen else ""
            yield Rule(chain, f"excluded network {network}", "RETURN", matches)
    for group in port_groups(options.exclude_ports):
        yield Rule(
            chain,
            f"excluded ports {group}",
            "RETURN",
            f"-p {protocol} -m multiport --dports {group}",
        )


def _taken(options: Options, chain: str, protocol: str, what: str, target: str) -> Iterator[Rule]:
    """The rest of the protocol, or only the included ports of it."""
    if not options.include_ports:
        yield Rule(chain, f"all other {protocol.upper()} {what}", target, f"-p {protocol}")
        return
    for group in port_groups(options.include_ports):
        yield Rule(
            chain,
            f"included ports {group} {what}",
            target,
            f"-p {protocol} -m multiport --dports {group}",
        )


def render(wanted: Sequence[Table]) -> str:
    """The restore text of a fresh install: what `--dry-run` prints."""
    lines: list[str] = []
    for table in wanted:
        lines.append(f"*{table.name}")
        lines += [f":{chain} - [0:0]" for chain in table.chains]
        lines += [rule.line for rule in table.rules]
        lines += [table.jump_addition, "COMMIT"]
    return "".join(f"{line}\n" for line in lines)


@dataclass(frozen=True)
class SavedTable:
    """One table as `iptables-save` printed it."""

    chains: tuple[tuple[str, str], ...] = ()  # (name, policy); policy "-" for user chains
    rules: tuple[str, ...] = ()  # "-A CHAIN ..." lines

    def own_chains(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.chains if is_own(name))

    def own_rules(self) -> tuple[str, ...]:
        return tuple(line for line in self.rules if is_own(rule_chain(line)))

    def own_jumps(self) -> tuple[str, ...]:
        """Rules outside the own chains that jump into them."""
        return tuple(
            line
            for line in self.rules
            if not is_own(rule_chain(line)) and is_own(rule_target(line) or "")
        )

    def holds_own(self) -> bool:
        return bool(self.own_chains() or self.own_jumps())

    def is_empty(self) -> bool:
        """No rules, no user chains, every built-in chain accepting: the same as no table."""
        return not self.rules and all(policy == "ACCEPT" for _, policy in self.chains)


def is_own(chain: str) -> bool:
    return chain.startswith(OWN_PREFIX)


def parse_save(text: str) -> dict[str, SavedTable]:
    """`iptables-save` output by table; comments and counters ignored."""
    saved: dict[str, SavedTable] = {}
    name: str | None = None
    chains: list[tuple[str, str]] = []
    rules: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            name, chains, rules = line[1:], [], []
        elif name is None or not line or line.startswith("#"):
            continue
        elif line == "COMMIT":
            saved[name] = SavedTable(tuple(chains), tuple(rules))
            name = None
        elif line.startswith(":"):
            chain, policy = line[1:].split()[:2]
            chains.append((chain, policy))
        elif line.startswith("-A "):
            rules.append(line)
    return saved


def rule_chain(line: str) -> str:
    return line.split()[1]


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:
        return []


def rule_target(line: str) -> str | None:
    tokens = _tokens(line)
    for index in range(len(tokens) - 2, -1, -1):
        if tokens[index] in ("-j", "--jump"):
            return tokens[index + 1]
    return None


def rule_comment(line: str) -> str:
    tokens = _tokens(line)
    for index, token in enumerate(tokens[:-1]):
        if token == "--comment":
            return tokens[index + 1]
    return ""


@dataclass(frozen=True)
class NetfilterState:
    """What a plan depends on, for one address family."""

    tables: Mapping[str, SavedTable]
    forwarding: bool
    tables_droppable: bool  # the backend can delete a table (nftables)


@dataclass(frozen=True)
class Plan:
    """The changes for one address family, in the order `apply` makes them."""

    restore: str  # iptables-restore --noflush input; empty: the rules are already so
    drop_tables: tuple[str, ...]  # tables install created; deleted if left empty
    forwarding: bool | None  # set the family's forwarding switch to this; None: leave it

    @property
    def changes(self) -> bool:
        return bool(self.restore or self.drop_tables or self.forwarding is not None)


def plan_install(options: Options, family: Family, state: NetfilterState) -> Plan:
    return _converge(tables(options, family), options.mode == GATEWAY, state)


def plan_uninstall(state: NetfilterState) -> Plan:
    return _converge((), False, state)


def _converge(wanted: Sequence[Table], wants_forwarding: bool, state: NetfilterState) -> Plan:
    receipts = {name: _receipts(saved) for name, saved in state.tables.items()}
    turned_on_forwarding = any(TURNED_ON_FORWARDING in notes for notes in receipts.values())
    forwarding: bool | None = None
    if wants_forwarding and not state.forwarding:
        forwarding = True
    elif not wants_forwarding and turned_on_forwarding and state.forwarding:
        forwarding = False
    blocks: list[str] = []
    for table in wanted:
        notes = []
        created = table.name not in state.tables or CREATED_TABLE in receipts[table.name]
        if state.tables_droppable and created:
            notes.append(CREATED_TABLE)
        if table.name == "nat" and wants_forwarding and (forwarding or turned_on_forwarding):
            notes.append(TURNED_ON_FORWARDING)
        blocks.append(_table_change(_noted(table, notes), state.tables.get(table.name)))
    wanted_names = {table.name for table in wanted}
    for name, saved in state.tables.items():
        if name not in wanted_names and saved.holds_own():
            blocks.append(_table_removal(name, saved))
    drop = tuple(
        name
        for name, notes in receipts.items()
        if CREATED_TABLE in notes and name not in wanted_names and state.tables_droppable
    )
    return Plan("".join(blocks), drop, forwarding)


def _receipts(saved: SavedTable) -> frozenset[str]:
    notes: set[str] = set()
    for line in (*saved.own_jumps(), *saved.own_rules()):
        notes.update(rule_comment(line).split("; ")[1:])
    chains = saved.own_chains()
    notes.update(note for note, chain in RECEIPT_CHAINS.items() if chain in chains)
    return frozenset(notes)


def _noted(table: Table, notes: Sequence[str]) -> Table:
    """The receipts on the jump, on the last rule of the own chains and as empty chains:
    a firewall reload or `iptables -F` drops the jump, or every rule, and leaves the
    chains, and install puts them back; read from the chains, the receipts are still
    there for uninstall."""
    if not notes:
        return table

    def noted(rule: Rule) -> Rule:
        return dataclasses.replace(rule, comment="; ".join((rule.comment, *notes)))

    return dataclasses.replace(
        table,
        chains=(*table.chains, *(RECEIPT_CHAINS[note] for note in notes)),
        rules=(*table.rules[:-1], noted(table.rules[-1])),
        jump=noted(table.jump),
    )


def _by_chain(lines: Iterable[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for line in lines:
        grouped.setdefault(rule_chain(line), []).append(line)
    return grouped


def _table_change(table: Table, saved: SavedTable | None) -> str:
    """Make one table's own chains and jump what `table` says, in one transaction.

    Declaring an existing chain in a `--noflush` restore flushes it, so the own chains
    are rewritten in place; a jump already there exactly as wanted and first in its
    chain is kept (other tools' rules keep their order around it); extra, outdated or
    displaced jumps and chains no longer wanted are removed first.
    """
    saved = saved or SavedTable()
    wanted_rules = [rule.line for rule in table.rules]
    chain = table.jump.chain
    in_place = next((line for line in saved.rules if rule_chain(line) == chain), "")
    kept = False
    deletions: list[str] = []
    for line in saved.own_jumps():
        if not kept and line == table.jump.line == in_place:
            kept = True
        else:
            deletions.append(f"-D {line[3:]}")
    stale = [chain for chain in saved.own_chains() if chain not in table.chains]
    unchanged = (
        kept
        and not deletions
        and not stale
        and set(saved.own_chains()) == set(table.chains)
        and _by_chain(saved.own_rules()) == _by_chain(wanted_rules)
    )
    if unchanged:
        return ""
    lines = [f"*{table.name}", *(f":{chain} - [0:0]" for chain in table.chains), *deletions]
    lines += [f"-F {chain}" for chain in stale] + [f"-X {chain}" for chain in stale]
    lines += wanted_rules
    if not kept:
        lines.append(table.jump_addition)
    lines.append("COMMIT")
    return "".join(f"{line}\n" for line in lines)


def _table_removal(name: str, saved: SavedTable) -> str:
    """Jumps first, then every own chain flushed before any is deleted (they refer to
    each other)."""
    chains = saved.own_chains()
    lines = [f"*{name}", *(f"-D {line[3:]}" for line in saved.own_jumps())]
    lines += [f"-F {chain}" for chain in chains] + [f"-X {chain}" for chain in chains]
    lines.append("COMMIT")
    return "".join(f"{line}\n" for line in lines)


def capture_problems(saved: Mapping[str, SavedTable]) -> list[str]:
    """Why installed own chains capture less than install made them: a table whose jump
    into them is gone (a firewall reload, `iptables -F`, a restore without --noflush), or
    a jump another tool's rule has since been put in front of (Docker puts its FORWARD
    jump first on every start). Install mends both."""
    problems = []
    receipts = RECEIPT_CHAINS.values()
    for name, table in saved.items():
        chains = [chain for chain in table.own_chains() if chain not in receipts]
        if not chains:
            continue
        jumps = table.own_jumps()
        if not jumps:
            problems.append(f"{name}: nothing jumps into {', '.join(chains)}")
        for line in jumps:
            chain = rule_chain(line)
            first = next(rule for rule in table.rules if rule_chain(rule) == chain)
            if first != line:
                problems.append(f"{name} {chain}: the jump into {rule_target(line)} is not first")
    return problems


def installed(saved: Mapping[str, SavedTable]) -> str:
    """The own chains, their rules and the jumps into them, as iptables-save shows them."""
    lines: list[str] = []
    for name, table in saved.items():
        if not table.holds_own():
            continue
        lines.append(f"*{name}")
        lines += [f":{chain} - [0:0]" for chain in table.own_chains()]
        lines += [*table.own_jumps(), *table.own_rules(), "COMMIT"]
    return "".join(f"{line}\n" for line in lines)
