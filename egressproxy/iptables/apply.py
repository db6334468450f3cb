"""Carry out `egressproxy iptables install|uninstall|show` on this network namespace.

Thin on purpose: every decision about rules is in `rules`. Here are the binaries
(`*-save` to read, `*-restore --noflush` to change, one transaction per family),
/proc/sys for the forwarding switch, netlink (pyroute2) to delete an nftables
table install created, and the failures a user can meet, each turned into one
line instead of a traceback.

Backend: the host's rules live either in nftables (iptables-nft) or in the old
x_tables (iptables-legacy), and rules added through the other one are silently
ignored by half the host. The backend already holding egressproxy's own chains wins
(install converges there and uninstall and show find them, whatever other tools
added to the other backend since); then, like linkerd2-proxy-init (after Calico's
feature_detect_linux.go) and kube's iptables-wrapper, the one holding Kubernetes'
canary chains, else the one with more rules, else nft.

Gateway mode turns on the family's forwarding switch (net.ipv4.ip_forward,
net.ipv6.conf.all.forwarding): the redirected TCP is delivered locally, but what
the rules leave alone (excluded ports and networks, DNS) must still be routed.
Uninstall turns it off again only if install was the one that turned it on.

Sidecar mode refuses to install where the workload's ephemeral ports overlap the
proxy's source ports (netfilter.PROXY_SOURCE_PORTS) and are not reserved: the two
would share conntrack tuples, and a workload could slip past the proxy.
Note that IPv6 forwarding makes the kernel ignore router advertisements unless
accept_ra is 2.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from egressproxy.iptables.rules import (
    GATEWAY,
    SIDECAR,
    Family,
    NetfilterState,
    Options,
    OptionsError,
    Plan,
    capture_problems,
    installed,
    parse_save,
    plan_install,
    plan_uninstall,
    render,
    tables,
    validate,
)
from egressproxy.netfilter import read_source_ports_conflict

TOOL_TIMEOUT = 60.0
# Seconds iptables-legacy-restore waits for the xtables lock another tool holds.
LOCK_WAIT = "10"
NEEDS_PRIVILEGE = "needs CAP_NET_ADMIN (run as root or in an init container with NET_ADMIN)"
LEGACY_NEEDS_PRIVILEGE = (
    "needs CAP_NET_ADMIN and CAP_NET_RAW (iptables-legacy talks to the kernel through a raw"
    " socket: run as root or in an init container with NET_ADMIN and NET_RAW)"
)
ROOT_RETURNED = (
    "WARNING: --proxy-uid 0 returns the traffic of every process running as root, the"
    " workload's too: run the proxy as a user of its own, or tell it apart by --proxy-mark"
)
DENIED = ("Permission denied", "Operation not permitted", "you must be root")
KUBERNETES_CANARIES = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
# iptables lives in sbin, which a non-root PATH often lacks.
SBIN = ("/usr/sbin", "/sbin")
# rtnetlink's route type of an ordinary route (RTN_UNICAST).
RTN_UNICAST = 1
FORWARDING = {
    Family.IPV4: Path("/proc/sys/net/ipv4/ip_forward"),
    Family.IPV6: Path("/proc/sys/net/ipv6/conf/all/forwarding"),
}


class ApplyError(Exception):
    """A failure the user can act on; the message is the whole story."""


class ToolFailed(ApplyError):
    """An iptables binary ran, had the privilege, and still failed."""


class NeedsPrivilege(ApplyError):
    """An iptables binary was refused: the message names the capabilities it needs."""


@dataclass(frozen=True)
class Backend:
    variant: str  # "nft", "legacy", or "" on a host with one unnamed iptables

    def tool(self, family: Family, action: str) -> str:
        return "-".join(part for part in (family.command, self.variant, action) if part)

    @property
    def name(self) -> str:
        return "-".join(part for part in ("iptables", self.variant) if part)

    @property
    def tables_droppable(self) -> bool:
        return self.variant == "nft"

    def installed_for(self, family: Family) -> bool:
        return all(find_tool(self.tool(family, action)) for action in ("save", "restore"))


def find_tool(name: str) -> str | None:
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=search)


def run_tool(name: str, *args: str, stdin: str | None = None) -> str:
    path = find_tool(name)
    if path is None:
        generic = re.sub(r"-(nft|legacy)-", "-", name)
        raise ApplyError(f"{generic} not found: install the iptables package")
    try:
        done = subprocess.run(
            [path, *args],
            input=stdin,
            capture_output=True,
            # Other tools' rules hold any bytes (a comment typed in a Latin-1 terminal):
            # read and written back (a jump deleted from their chain) unchanged.
            encoding="utf-8",
            errors="surrogateescape",
            timeout=TOOL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ApplyError(f"{name} did not finish in {TOOL_TIMEOUT:g} s") from None
    except OSError as error:
        raise ApplyError(f"cannot run {path}: {error.strerror}") from None
    if done.returncode == 0:
        return done.stdout
    message = " ".join((done.stderr or done.stdout).split()) or f"exit status {done.returncode}"
    if any(word in message for word in DENIED):
        needs = LEGACY_NEEDS_PRIVILEGE if "-legacy-" in name else NEEDS_PRIVILEGE
        raise NeedsPrivilege(f"{name}: {needs}")
    failed_line = re.search(r"line:? (\d+)", message)
    if stdin is not None and failed_line:
        number = int(failed_line.group(1))
        lines = stdin.splitlines()
        if 0 < number <= len(lines):
            message = f"{message} (input line {number}: {lines[number - 1]})"
    raise ToolFailed(f"{name} failed: {message}")


def detect_backend() -> Backend:
    candidates = [Backend(variant) for variant in ("nft", "legacy")]
    present = [backend for backend in candidates if backend.installed_for(Family.IPV4)]
    if not present:
        plain = Backend("")
        if not plain.installed_for(Family.IPV4):
            raise ApplyError("iptables-restore not found: install the iptables package")
        return plain
    if len(present) == 1:
        return present[0]
    nft, legacy = present
    saved = {nft: _save_everything(nft)}
    try:
        saved[legacy] = _save_everything(legacy)
    except NeedsPrivilege as refused:
        # A pod's init container has NET_ADMIN only, and its namespace may hold empty
        # legacy tables (a kernel with the legacy modules loaded): nft serves it.
        print(
            f"egressproxy iptables: {refused}; its rules, if any, stay unread and"
            f" {nft.name} is used (the kernel applies both)",
            file=sys.stderr,
        )
        return nft
    for backend in present:
        if any(table.holds_own() for text in saved[backend] for table in parse_save(text).values()):
            return backend
    for backend in present:
        if any(canary in text for text in saved[backend] for canary in KUBERNETES_CANARIES):
            return backend
    return legacy if _rule_count(saved[legacy]) > _rule_count(saved[nft]) else nft


def _save_everything(backend: Backend) -> list[str]:
    """Each family's rules, apart: joined, IPv6's tables would hide IPv4's of the same
    name from parse_save. A backend the kernel cannot serve holds none.

    Never `-t TABLE`: legacy save would instantiate the table it is asked for."""
    texts = []
    for family in Family:
        if backend.installed_for(family):
            try:
                texts.append(run_tool(backend.tool(family, "save")))
            except ToolFailed:
                continue
    return texts


def _rule_count(saved: list[str]) -> int:
    return sum(1 for text in saved for line in text.splitlines() if line.startswith("-"))


def families(backend: Backend, ipv6: bool | None, action: str) -> list[Family]:
    """`--ipv6` asks for IPv6 and fails without it; left unsaid, IPv6 is programmed when
    ip6tables works, a capture without it warns if the namespace uses IPv6, and show or
    uninstall without it warns that IPv6 rules of an earlier install go unseen."""
    if ipv6 is False:
        return [Family.IPV4]
    kernel_has_ipv6 = Path("/proc/net/if_inet6").exists()
    unusable = _ip6tables_unusable(backend) if kernel_has_ipv6 else "this kernel has no IPv6"
    if unusable is None:
        return [Family.IPV4, Family.IPV6]
    if ipv6:
        raise ApplyError(f"--ipv6: {unusable}")
    if not kernel_has_ipv6:
        return [Family.IPV4]
    if action != "install":
        print(f"egressproxy iptables {action}: {unchecked_ipv6(action, unusable)}", file=sys.stderr)
    elif used := read_ipv6_in_use():
        print(f"egressproxy iptables install: {uncaptured_ipv6(unusable, used)}", file=sys.stderr)
    return [Family.IPV4]


def _ip6tables_unusable(backend: Backend) -> str | None:
    if not backend.installed_for(Family.IPV6):
        return f"{Family.IPV6.command}-restore not found: install the iptables package"
    try:
        run_tool(backend.tool(Family.IPV6, "save"))
    except ToolFailed as error:
        return str(error)
    return None


def ipv6_in_use(addresses: Iterable[tuple[str, str]], default_route: bool) -> list[str]:
    """What lets this namespace's IPv6 reach past its links: (address, interface) pairs
    other than loopback and link-local, and a default route."""
    used = [
        f"{address} on {interface}"
        for address, interface in addresses
        if not (ip := ipaddress.IPv6Address(address)).is_loopback and not ip.is_link_local
    ]
    if default_route:
        used.append("a default route")
    return used


def unchecked_ipv6(action: str, unusable: str) -> str:
    what = "shown" if action == "show" else "removed"
    return (
        f"WARNING: IPv6 rules are not {what} ({unusable}): any an earlier install made are"
        f" {'unseen' if action == 'show' else 'left in place'}; pass --no-ipv6 if it made none"
    )


def uncaptured_ipv6(unusable: str, used: Sequence[str]) -> str:
    return (
        f"WARNING: IPv6 is NOT captured ({unusable}), yet this namespace uses IPv6"
        f" ({', '.join(used)}): its IPv6 connections bypass the proxy. Install ip6tables"
        " (the iptables package), or turn IPv6 off (sysctl net.ipv6.conf.all.disable_ipv6=1"
        " net.ipv6.conf.default.disable_ipv6=1), or pass --no-ipv6 to accept the gap"
        " (--ipv6 makes it an error)"
    )


def read_ipv6_in_use() -> list[str]:
    """Addresses and default routes, over netlink; unreadable counts as in use."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    try:
        with IPRoute() as netlink:
            names = {link["index"]: link.get("IFLA_IFNAME") for link in netlink.get_links()}
            addresses = [
                (message.get("IFA_ADDRESS"), names.get(message["index"], "?"))
                for message in netlink.get_addr(family=socket.AF_INET6)
            ]
            default_route = any(
                route["dst_len"] == 0 and route["type"] == RTN_UNICAST
                for route in netlink.get_routes(family=socket.AF_INET6)
            )
    except (NetlinkError, OSError) as error:
        return [f"addresses unreadable: {error}"]
    return ipv6_in_use(addresses, default_route)


def read_state(backend: Backend, family: Family) -> NetfilterState:
    saved = parse_save(run_tool(backend.tool(family, "save")))
    return NetfilterState(saved, forwarding_on(family), backend.tables_droppable)


def forwarding_on(family: Family) -> bool:
    path = FORWARDING[family]
    try:
        return path.read_text().strip() != "0"
    except FileNotFoundError:
        return False
    except OSError as error:
        raise ApplyError(f"{path}: {error.strerror}") from None


def set_forwarding(family: Family, on: bool) -> None:
    path = FORWARDING[family]
    try:
        path.write_text("1\n" if on else "0\n")
    except OSError as error:
        denied = error.errno in (errno.EACCES, errno.EPERM)
        reason = NEEDS_PRIVILEGE if denied else error.strerror
        raise ApplyError(
            f"cannot turn forwarding {'on' if on else 'off'}: {path}: {reason}"
        ) from None


def drop_table(family: Family, name: str) -> None:
    """Delete an nftables table install created and uninstall emptied (iptables-nft
    leaves it behind, and iptables-save would show it)."""
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.nftables.main import NFTables  # type: ignore[import-untyped]

    address_family = socket.AF_INET if family is Family.IPV4 else socket.AF_INET6
    what = f"deleting the empty {family.label} nftables table {name}"
    try:
        nftables = NFTables(nfgen_family=address_family)
        try:
            nftables.table("del", name=name)
        finally:
            nftables.close()
    except NetlinkError as error:
        reason = NEEDS_PRIVILEGE if error.code == errno.EPERM else os.strerror(error.code)
        raise ApplyError(f"{what}: {reason}") from None
    except OSError as error:
        raise ApplyError(f"{what}: {error.strerror}") from None


def carry_out(backend: Backend, family: Family, plan: Plan) -> None:
    """Rules first (capture is in place before forwarding opens), then the switch,
    then the tables left empty."""
    if plan.restore:
        run_tool(backend.tool(family, "restore"), "-w", LOCK_WAIT, "--noflush", stdin=plan.restore)
    if plan.forwarding is not None:
        set_forwarding(family, plan.forwarding)
    if plan.drop_tables:
        saved = parse_save(run_tool(backend.tool(family, "save")))
        for name in plan.drop_tables:
            if name in saved and saved[name].is_empty():
                drop_table(family, name)


def print_install(options: Options) -> None:
    """What install would restore into an untouched namespace; nothing is read or run."""
    chosen = [Family.IPV4] if options.ipv6 is False else list(Family)
    for family in chosen:
        print(f"# {family.command}-restore --noflush\n{render(tables(options, family))}", end="")
        if options.mode == GATEWAY:
            print(f"# then {FORWARDING[family]} = 1 if it is 0 (gateway mode routes the rest)")


def removal_text(family: Family, restore_tool: str, plan: Plan) -> str:
    """An uninstall plan as `--dry-run` prints it: the restore text, then the receipts
    it would act on as comments."""
    lines = [f"# {restore_tool} --noflush\n{plan.restore}"] if plan.restore else []
    if plan.forwarding is False:
        lines.append(f"# then {FORWARDING[family]} = 0 (install turned it on)\n")
    lines += [
        f"# then the {family.label} nftables table {name} is deleted if left empty"
        " (install created it)\n"
        for name in plan.drop_tables
    ]
    return "".join(lines)


def print_removal(backend: Backend, chosen: list[Family]) -> None:
    """What uninstall would do here: read from the installed rules and their receipts, so
    it needs no capture options."""
    texts = [
        removal_text(
            family, backend.tool(family, "restore"), plan_uninstall(read_state(backend, family))
        )
        for family in chosen
    ]
    print("".join(texts), end="")
    if not any(texts):
        print("no egressproxy rules are installed", file=sys.stderr)


def show(backend: Backend, chosen: list[Family]) -> int:
    """Exit 1 when nothing is installed, 3 when what is installed no longer captures all
    it should (a jump gone or overtaken), so scripts and monitors can ask."""
    found = False
    problems = []
    for family in chosen:
        tables = read_state(backend, family).tables
        text = installed(tables)
        if text:
            found = True
            print(f"# {family.label} ({backend.tool(family, 'save')})\n{text}", end="")
        problems += [f"{family.label} {problem}" for problem in capture_problems(tables)]
    if not found:
        print("no egressproxy rules are installed", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"egressproxy: {problem}: run install again", file=sys.stderr)
    return 3 if problems else 0


def converge(action: str, options: Options, backend: Backend, chosen: list[Family]) -> None:
    changed = []
    for family in chosen:
        state = read_state(backend, family)
        plan = (
            plan_install(options, family, state) if action == "install" else plan_uninstall(state)
        )
        carry_out(backend, family, plan)
        if plan.changes:
            changed.append(family.label)
    labels = " and ".join(family.label for family in chosen)
    if action == "install":
        outcome = "installed" if changed else "already installed"
        print(f"egressproxy rules {outcome} ({labels}, {backend.name})")
    elif changed:
        print(f"egressproxy rules removed ({' and '.join(changed)}, {backend.name})")
    else:
        print(f"no egressproxy rules were installed ({labels}, {backend.name})")


def main(action: str, options: Options, dry_run: bool) -> int:
    """Exit 0 done, 1 the system refused (message says why), 2 the options are wrong."""
    try:
        if action == "install":
            validate(options)
            if options.proxy_uid == 0:
                print(f"egressproxy iptables install: {ROOT_RETURNED}", file=sys.stderr)
            conflict = read_source_ports_conflict() if options.mode == SIDECAR else ""
            if dry_run:
                print_install(options)
                if conflict:  # the rules are shown, and why they would not be installed
                    raise ApplyError(f"install would refuse: {conflict}")
                return 0
            if conflict:
                raise ApplyError(conflict)
        backend = detect_backend()
        chosen = families(backend, options.ipv6, action)
        if action == "show":
            return show(backend, chosen)
        if dry_run:
            print_removal(backend, chosen)
            return 0
        converge(action, options, backend, chosen)
        return 0
    except OptionsError as error:
        print(f"egressproxy iptables {action}: {error}", file=sys.stderr)
        return 2
    except ApplyError as error:
        print(f"egressproxy iptables {action}: {error}", file=sys.stderr)
        return 1
