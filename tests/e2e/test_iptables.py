"""`egressproxy iptables` for real, in network namespaces this test creates and removes.

Every test builds its own namespaces (ep-ipt-<pid>-<n>) joined by veth pairs;
the "internet" is a far namespace holding documentation addresses
(203.0.113.10, 198.51.100.7, 2001:db8:113::10) behind 198.18.0.0/15 and
2001:db8::/32 links. The host's own network is never touched.

This file doubles as the small program run inside the namespaces (`serve`,
`probe`; see the bottom): its source is handed to `python -c`, so a client
running as the proxy's uid needs no read access to the checkout.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

PROXY_UID = 2102
PROXY_PORT = 15001
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number
COMMAND_TIMEOUT = 30.0
READY_TIMEOUT = 10.0
SERVE_LIMIT = 120.0
PROBE_TIMEOUT = 3.0
UDP_WAIT = 1.0
SAVE_TOOLS = (
    "iptables-save",
    "ip6tables-save",
    "iptables-nft-save",
    "ip6tables-nft-save",
    "iptables-legacy-save",
    "ip6tables-legacy-save",
)
FAR_V4 = "203.0.113.10"
EXCLUDED_V4 = "198.51.100.7"
FAR_V6 = "2001:db8:113::10"
FAR_PORTS = (443, 8443, 53)
COUNTERS = re.compile(r"\[\d+:\d+\]$", re.MULTILINE)
HIDE_SBIN = 'mount -t tmpfs tmpfs /usr/sbin && exec "$@"'
_numbers = itertools.count(1)

Probe = tuple[str, str, int]  # protocol, address, port
Completed = subprocess.CompletedProcess[str]


# --- the program run inside the namespaces -------------------------------------------------


def serve(specs: Sequence[Sequence[object]]) -> None:
    """Answer TCP connections and UDP datagrams until stdin closes (or SERVE_LIMIT).

    A spec is (protocol, address, port, reply); the reply "redirected" answers with
    the connection's SO_ORIGINAL_DST, as the proxy would read it."""
    selector = selectors.DefaultSelector()
    listeners: dict[int, tuple[socket.socket, str]] = {}
    for protocol, address, port, reply in specs:
        family = socket.AF_INET6 if ":" in str(address) else socket.AF_INET
        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(address), int(str(port))))
        if kind == socket.SOCK_STREAM:
            sock.listen(16)
        selector.register(sock, selectors.EVENT_READ)
        listeners[sock.fileno()] = (sock, str(reply))
    selector.register(sys.stdin, selectors.EVENT_READ)
    print("ready", flush=True)
    deadline = time.monotonic() + SERVE_LIMIT
    while time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1.0):
            if key.fd not in listeners:
                return
            sock, reply = listeners[key.fd]
            if sock.type == socket.SOCK_STREAM:
                connection, _ = sock.accept()
                with connection:
                    if reply == "redirected":
                        reply = f"redirected {original_destination(connection)}"
                    connection.sendall(reply.encode())
            else:
                _, peer = sock.recvfrom(2048)
                sock.sendto(reply.encode(), peer)


def original_destination(connection: socket.socket) -> str:
    if connection.family == socket.AF_INET:
        raw = connection.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        address = socket.inet_ntop(socket.AF_INET, raw[4:8])
    else:
        raw = connection.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        address = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    return f"{address} {int.from_bytes(raw[2:4], 'big')}"


def probe(checks: Sequence[Sequence[object]]) -> None:
    """Print, as JSON, what each (protocol, address, port) got back."""
    results = []
    for protocol, address, port in checks:
        target = (str(address), int(str(port)))
        results.append(tcp_probe(target) if protocol == "tcp" else udp_probe(target))
    print(json.dumps(results))


def tcp_probe(target: tuple[str, int]) -> str:
    try:
        with socket.create_connection(target, timeout=PROBE_TIMEOUT) as connection:
            chunks = []
            for _ in range(64):
                chunk = connection.recv(256)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode()
    except TimeoutError:
        return "timed out"
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error))


def udp_probe(target: tuple[str, int]) -> str:
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(UDP_WAIT)
        try:
            sock.sendto(b"ping", target)
        except PermissionError:
            return "dropped"
        try:
            return sock.recv(256).decode()
        except TimeoutError:
            return "no answer"


# --- the test side ---------------------------------------------------------------------------


def repo() -> Path:
    return Path(__file__).resolve().parents[2]


def program() -> str:
    """This file's source, for `python -c` (`__file__` exists only on the test side)."""
    return Path(__file__).read_text()


def run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> Completed:
    # Other tools' rules may hold any bytes (a comment typed in a Latin-1 terminal).
    done = subprocess.run(
        args,
        capture_output=True,
        encoding="utf-8",
        errors="surrogateescape",
        timeout=COMMAND_TIMEOUT,
        check=False,
        env=env,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def sh(line: str) -> Completed:
    """A command line without quoting: words split on blanks."""
    return run(*line.split())


def egressproxy(
    ns: str, *args: str, prefix: Sequence[str] = (), path_first: Path | None = None
) -> Completed:
    """`python -m egressproxy iptables ARGS` inside namespace `ns`, from this checkout;
    binaries in `path_first` win over the system's."""
    env = {**os.environ, "PYTHONPATH": str(repo())}
    if path_first is not None:
        env["PATH"] = os.pathsep.join((str(path_first), env.get("PATH", "")))
    command = ["ip", "netns", "exec", ns, *prefix, sys.executable, "-m", "egressproxy", "iptables"]
    return run(*command, *args, check=False, env=env)


def saved_rules(ns: str) -> dict[str, str]:
    """Every backend's and family's iptables-save output but header comments and the
    legacy backend's packet counters."""
    outputs = {}
    for tool in SAVE_TOOLS:
        text = sh(f"ip netns exec {ns} {tool}").stdout
        lines = [line for line in text.splitlines(True) if not line.startswith("#")]
        outputs[tool] = COUNTERS.sub("[0:0]", "".join(lines))
    return outputs


def forwarding(ns: str) -> tuple[str, str]:
    paths = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")
    v4, v6 = (sh(f"ip netns exec {ns} cat {path}").stdout.strip() for path in paths)
    return v4, v6


RECEIPTS = re.compile(r'(?:; (?:created table|turned on forwarding))+"')


def own_rules_by_chain(text: str) -> dict[str, list[str]]:
    """The rules of the own chains, without install's receipts (what it created or turned
    on, noted on the last rule only when it did): a dry run of install prints none."""
    chains: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("-A EGRESSPROXY_"):
            chains.setdefault(line.split()[1], []).append(RECEIPTS.sub('"', line))
    return chains


@dataclass
class Lab:
    """Namespaces and helper processes of one test, all removed when it ends."""

    stack: contextlib.ExitStack

    def namespace(self) -> str:
        name = f"ep-ipt-{os.getpid()}-{next(_numbers)}"
        sh(f"ip netns add {name}")
        self.stack.callback(run, "ip", "netns", "del", name, check=False)
        sh(f"ip -n {name} link set lo up")
        return name

    def link(
        self, left: str, left_addresses: str, right: str, right_addresses: str
    ) -> tuple[str, str]:
        """A veth pair between two namespaces, made inside them (never in the host's);
        addresses blank-separated, IPv6 ones usable at once (nodad). Returns its ends."""
        number = next(_numbers)
        left_dev, right_dev = f"epl{number}", f"epr{number}"
        sh(f"ip -n {left} link add {left_dev} type veth peer name {right_dev} netns {right}")
        for ns, dev, addresses in (
            (left, left_dev, left_addresses),
            (right, right_dev, right_addresses),
        ):
            for address in addresses.split():
                nodad = "nodad" if ":" in address else ""
                sh(f"ip -n {ns} addr add {address} dev {dev} {nodad}")
            sh(f"ip -n {ns} link set {dev} up")
        return left_dev, right_dev

    def serve(self, ns: str, specs: Sequence[tuple[str, str, int, str]]) -> None:
        process = subprocess.Popen(
            [*in_namespace(ns), "serve", json.dumps(specs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stack.callback(stop, process)
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=READY_TIMEOUT):
                raise AssertionError(f"server in {ns} not ready in {READY_TIMEOUT} s")
        line = process.stdout.readline().strip()
        if line != "ready":
            assert process.stderr is not None
            raise AssertionError(f"server in {ns} failed: {line} {process.stderr.read()}")


def stop(process: subprocess.Popen[str]) -> None:
    """Closing stdin asks the server to end; a kill (by its PID) if it does not."""
    with process:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


def in_namespace(ns: str, as_user: Sequence[str] = ()) -> list[str]:
    """This file as a program, run inside namespace `ns` (optionally as another user)."""
    return ["ip", "netns", "exec", ns, *as_user, sys.executable, "-I", "-c", program()]


def probes(ns: str, checks: Sequence[Probe], uid: int | None = None) -> dict[Probe, str]:
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid else []
    done = run(*in_namespace(ns, as_user), "probe", json.dumps(checks))
    return dict(zip(checks, json.loads(done.stdout), strict=True))


@pytest.fixture
def lab() -> Iterator[Lab]:
    with contextlib.ExitStack() as stack:
        yield Lab(stack)


def far_side(lab: Lab, near: str, near_v4: str, near_v6: str, far_v4: str, far_v6: str) -> str:
    """The "internet": a namespace answering "far" on FAR_PORTS at the documentation addresses."""
    far = lab.namespace()
    lab.link(near, f"{near_v4}/24 {near_v6}/64", far, f"{far_v4}/24 {far_v6}/64")
    for address in (f"{FAR_V4}/32", f"{EXCLUDED_V4}/32", f"{FAR_V6}/128"):
        sh(f"ip -n {far} addr add {address} dev lo")
    # UDP answers from the address it was asked at only when bound to it.
    specs = [("tcp", address, port, "far") for address in ("0.0.0.0", "::") for port in FAR_PORTS]
    specs += [("udp", address, port, "far") for address in (FAR_V4, FAR_V6) for port in FAR_PORTS]
    lab.serve(far, specs)
    return far


def route(ns: str, gateway_v4: str, gateway_v6: str) -> None:
    for network in ("203.0.113.0/24", "198.51.100.0/24"):
        sh(f"ip -n {ns} route add {network} via {gateway_v4}")
    sh(f"ip -n {ns} -6 route add 2001:db8:113::/64 via {gateway_v6}")


def seed(ns: str, variant: str) -> None:
    """Rules of some other tool, which install must work around and uninstall must keep:
    among them ufw's shape, new UDP accepted in OUTPUT, and the shape of kube-proxy's
    Service rules, a nat OUTPUT rule ending the chain for TCP to the far side's port 443
    (each would let what it matches past a jump behind it)."""
    for command, address, far in (
        ("iptables", "192.0.2.99", FAR_V4),
        ("ip6tables", "2001:db8:ffff::99", FAR_V6),
    ):
        tool = f"ip netns exec {ns} {command}-{variant}"
        for table, chain in (("nat", "OUTPUT"), ("filter", "OUTPUT")):
            sh(
                f"{tool} -t {table} -A {chain} -d {address}"
                " -m comment --comment not-egressproxy -j RETURN"
            )
        sh(f"{tool} -A OUTPUT -p udp -m conntrack --ctstate NEW -j ACCEPT")
        sh(f"{tool} -t nat -A OUTPUT -d {far} -p tcp --dport 443 -j ACCEPT")


PROXY_LISTENERS = [
    ("tcp", "0.0.0.0", PROXY_PORT, "redirected"),
    ("tcp", "::", PROXY_PORT, "redirected"),
]
SIDECAR_OPTIONS = (
    f"--proxy-uid={PROXY_UID}",
    "--exclude-ports=8443",
    "--exclude-cidrs=198.51.100.0/24",
    "--block-udp",
)


@pytest.mark.parametrize("existing", ["none", "nft", "legacy"])
def test_sidecar_install_redirects_and_uninstall_restores(lab: Lab, existing: str) -> None:
    app = lab.namespace()
    far = far_side(lab, app, "198.18.0.1", "2001:db8:18::1", "198.18.0.2", "2001:db8:18::2")
    route(app, "198.18.0.2", "2001:db8:18::2")
    pod_server = ("udp", "198.18.0.1", 5000)
    lab.serve(app, [*PROXY_LISTENERS, ("tcp", "0.0.0.0", 9000, "local"), (*pod_server, "pod")])
    if existing != "none":
        seed(app, existing)
    backend = "legacy" if existing == "legacy" else "nft"

    tcp = ("tcp", FAR_V4, 443)
    tcp6 = ("tcp", FAR_V6, 443)
    udp_quic = ("udp", FAR_V4, 443)
    udp_quic6 = ("udp", FAR_V6, 443)
    udp_dns = ("udp", FAR_V4, 53)
    udp_dns6 = ("udp", FAR_V6, 53)
    assert probes(app, [tcp, tcp6, udp_quic]) == {tcp: "far", tcp6: "far", udp_quic: "far"}

    before = saved_rules(app)
    dry = egressproxy(app, "install", *SIDECAR_OPTIONS, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert saved_rules(app) == before

    first = egressproxy(app, "install", *SIDECAR_OPTIONS)
    assert first.returncode == 0, first.stderr
    assert f"installed (IPv4 and IPv6, iptables-{backend})" in first.stdout
    installed = saved_rules(app)
    again = egressproxy(app, "install", *SIDECAR_OPTIONS)
    assert again.returncode == 0, again.stderr
    assert "already installed" in again.stdout
    assert saved_rules(app) == installed

    shown = egressproxy(app, "show")
    assert shown.returncode == 0, shown.stderr
    v4_dry, v6_dry = dry.stdout.split("# ip6tables-restore --noflush\n")
    v4_shown, v6_shown = shown.stdout.split("# IPv6")
    assert own_rules_by_chain(v4_shown) == own_rules_by_chain(v4_dry)
    assert own_rules_by_chain(v6_shown) == own_rules_by_chain(v6_dry)
    assert set(own_rules_by_chain(v4_shown)) == {
        "EGRESSPROXY_OUTPUT",
        "EGRESSPROXY_REDIRECT",
        "EGRESSPROXY_UDP",
    }
    assert own_rules_by_chain(installed[f"iptables-{backend}-save"]) == own_rules_by_chain(v4_dry)
    other = "nft" if backend == "legacy" else "legacy"
    for family in ("iptables", "ip6tables"):
        tool = f"{family}-{other}-save"
        assert installed[tool] == before[tool], f"{tool} changed: the wrong backend was used"

    workload = probes(
        app,
        [
            tcp,
            tcp6,
            ("tcp", FAR_V4, 8443),
            ("tcp", EXCLUDED_V4, 443),
            ("tcp", "127.0.0.1", 9000),
            ("tcp", "198.18.0.1", 9000),
            udp_quic,
            udp_quic6,
            udp_dns,
            udp_dns6,
        ],
    )
    assert workload == {
        tcp: f"redirected {FAR_V4} 443",
        tcp6: f"redirected {FAR_V6} 443",
        ("tcp", FAR_V4, 8443): "far",
        ("tcp", EXCLUDED_V4, 443): "far",
        ("tcp", "127.0.0.1", 9000): "local",
        ("tcp", "198.18.0.1", 9000): "local",
        udp_quic: "dropped",
        udp_quic6: "dropped",
        udp_dns: "far",
        udp_dns6: "far",
    }
    proxy = probes(app, [tcp, tcp6, udp_quic], uid=PROXY_UID)
    assert proxy == {tcp: "far", tcp6: "far", udp_quic: "far"}
    assert probes(far, [pod_server]) == {pod_server: "pod"}, "a UDP server in the pod answers"

    removed = egressproxy(app, "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert saved_rules(app) == before
    assert probes(app, [tcp, tcp6, udp_quic]) == {tcp: "far", tcp6: "far", udp_quic: "far"}
    nothing = egressproxy(app, "show")
    assert nothing.returncode == 1
    assert "no egressproxy rules are installed" in nothing.stderr


def test_show_tells_a_jump_that_is_gone_and_install_puts_it_back(lab: Lab) -> None:
    """A firewall reload or `iptables -t nat -F OUTPUT` drops the jump and leaves our
    chains: show exits 3 naming it, and install mends it."""
    app = lab.namespace()
    installed = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}", "--no-ipv6")
    assert installed.returncode == 0, installed.stderr
    sh(f"ip netns exec {app} iptables -t nat -F OUTPUT")
    broken = egressproxy(app, "show")
    assert broken.returncode == 3
    assert broken.stderr == (
        "egressproxy: IPv4 nat: nothing jumps into EGRESSPROXY_OUTPUT, EGRESSPROXY_REDIRECT:"
        " run install again\n"
    )
    mended = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}", "--no-ipv6")
    assert mended.returncode == 0, mended.stderr
    shown = egressproxy(app, "show")
    assert (shown.returncode, shown.stderr) == (0, "")
    assert egressproxy(app, "uninstall").returncode == 0


def test_reinstall_with_other_options_leaves_only_the_new_rules(lab: Lab) -> None:
    app = lab.namespace()
    before = saved_rules(app)
    wide = egressproxy(app, "install", "--proxy-mark=7", "--block-udp", "--exclude-ports=22")
    assert wide.returncode == 0, wide.stderr
    narrow = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}", "--no-ipv6")
    assert narrow.returncode == 0, narrow.stderr
    after = saved_rules(app)
    assert "EGRESSPROXY_UDP" not in after["iptables-save"]
    assert "--mark" not in after["iptables-save"]
    assert "EGRESSPROXY_UDP" in after["ip6tables-save"], "--no-ipv6 must leave IPv6 alone"
    fresh = lab.namespace()
    assert egressproxy(fresh, "install", f"--proxy-uid={PROXY_UID}", "--no-ipv6").returncode == 0
    assert saved_rules(fresh)["iptables-save"] == after["iptables-save"]
    assert egressproxy(app, "uninstall").returncode == 0
    assert saved_rules(app) == before


@pytest.mark.parametrize("excluded", ["0.0.0.0/0,::/0", "::c000:200/120,::ffff:c000:200/120"])
def test_excluding_networks_iptables_save_prints_its_own_way_installs_once(
    lab: Lab, excluded: str
) -> None:
    """iptables-save prints no `-d 0.0.0.0/0`, and `::192.0.2.0/120` for ::c000:200/120: a
    second install still sees the first."""
    app = lab.namespace()
    before = saved_rules(app)
    options = (f"--proxy-uid={PROXY_UID}", f"--exclude-cidrs={excluded}", "--block-udp")
    first = egressproxy(app, "install", *options)
    assert first.returncode == 0, first.stderr
    installed = saved_rules(app)
    again = egressproxy(app, "install", *options)
    assert again.returncode == 0, again.stderr
    assert "already installed" in again.stdout
    assert saved_rules(app) == installed
    assert egressproxy(app, "uninstall").returncode == 0
    assert saved_rules(app) == before


def test_gateway_redirects_routed_tcp_and_forwards_the_rest(lab: Lab) -> None:
    client = lab.namespace()
    gateway = lab.namespace()
    lab.link(client, "198.18.1.2/24 2001:db8:1::2/64", gateway, "198.18.1.1/24 2001:db8:1::1/64")
    route(client, "198.18.1.1", "2001:db8:1::1")
    far = far_side(lab, gateway, "198.18.2.1", "2001:db8:2::1", "198.18.2.2", "2001:db8:2::2")
    route(gateway, "198.18.2.2", "2001:db8:2::2")
    sh(f"ip -n {far} route add 198.18.1.0/24 via 198.18.2.1")
    sh(f"ip -n {far} -6 route add 2001:db8:1::/64 via 2001:db8:2::1")
    lab.serve(gateway, PROXY_LISTENERS)
    for switch in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        sh(f"ip netns exec {gateway} sysctl -qw {switch}=0")
    # Docker's shape: traffic from a bridge accepted in FORWARD, which ends the chain.
    sh(f"ip netns exec {gateway} iptables-nft -A FORWARD -s 198.18.1.0/24 -j ACCEPT")
    before = saved_rules(gateway)

    options = ("--mode=gateway", "--exclude-ports=8443", "--block-udp")
    installed = egressproxy(gateway, "install", *options)
    assert installed.returncode == 0, installed.stderr
    assert egressproxy(gateway, "install", *options).stdout.startswith("egressproxy rules already")
    assert forwarding(gateway) == ("1", "1")

    tcp, tcp6 = ("tcp", FAR_V4, 443), ("tcp", FAR_V6, 443)
    routed = probes(
        client,
        [
            tcp,
            tcp6,
            ("tcp", FAR_V4, 8443),
            ("tcp", FAR_V6, 8443),
            ("udp", FAR_V4, 443),
            ("udp", FAR_V4, 53),
            ("udp", FAR_V6, 53),
        ],
    )
    assert routed == {
        tcp: f"redirected {FAR_V4} 443",
        tcp6: f"redirected {FAR_V6} 443",
        ("tcp", FAR_V4, 8443): "far",
        ("tcp", FAR_V6, 8443): "far",
        ("udp", FAR_V4, 443): "no answer",
        ("udp", FAR_V4, 53): "far",
        ("udp", FAR_V6, 53): "far",
    }
    assert probes(gateway, [tcp, tcp6]) == {tcp: "far", tcp6: "far"}, "own traffic is not routed"

    installed_rules = saved_rules(gateway)
    dry = egressproxy(gateway, "uninstall", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert saved_rules(gateway) == installed_rules
    assert forwarding(gateway) == ("1", "1")
    v4_dry, v6_dry = dry.stdout.split("# ip6tables-nft-restore --noflush\n")
    for text, family in ((v4_dry, "ipv4"), (v6_dry, "ipv6")):
        assert (
            '-D PREROUTING -p tcp -m comment --comment "egressproxy: capture routed TCP;'
            ' created table; turned on forwarding" -j EGRESSPROXY_PREROUTING\n'
        ) in text
        assert "-X EGRESSPROXY_UDP\n" in text
        assert f"# then /proc/sys/net/{family}/" in text
        assert "nftables table nat is deleted if left empty (install created it)\n" in text
    assert "198.18.1.0/24" not in dry.stdout, "other tools' rules are not touched"

    removed = egressproxy(gateway, "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert saved_rules(gateway) == before
    assert forwarding(gateway) == ("0", "0")
    nothing = egressproxy(gateway, "uninstall", "--dry-run")
    assert (nothing.returncode, nothing.stdout) == (0, "")
    assert "no egressproxy rules are installed" in nothing.stderr


@pytest.mark.parametrize("flush", ["-F PREROUTING", "-F"])
def test_uninstall_after_install_mended_a_flush_turns_forwarding_off(lab: Lab, flush: str) -> None:
    """The README's repair: `iptables -F` dropped the jumps, or every rule of the table
    (show exits 3), install puts them back. The receipts lived on the jumps, then on the
    rules only, so uninstall then left forwarding on (the gateway routing past the proxy)
    and the tables it had made."""
    gateway = lab.namespace()
    for switch in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        sh(f"ip netns exec {gateway} sysctl -qw {switch}=0")
    before = saved_rules(gateway)
    assert egressproxy(gateway, "install", "--mode=gateway").returncode == 0
    assert forwarding(gateway) == ("1", "1")
    for tool in ("iptables-nft", "ip6tables-nft"):
        sh(f"ip netns exec {gateway} {tool} -t nat {flush}")
    assert egressproxy(gateway, "show").returncode == 3
    mended = egressproxy(gateway, "install", "--mode=gateway")
    assert mended.returncode == 0, mended.stderr
    assert egressproxy(gateway, "show").returncode == 0
    removed = egressproxy(gateway, "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert forwarding(gateway) == ("0", "0")
    assert saved_rules(gateway) == before


def test_sidecar_install_refuses_ephemeral_ports_that_overlap_the_proxy_ports(lab: Lab) -> None:
    """Workload connections drawing ports from the proxy's source ports could share a
    conntrack tuple with the proxy's: install says so and how to fix it (a dry run too,
    after the rules it shows), and installs once the ports are reserved."""
    app = lab.namespace()
    before = saved_rules(app)
    run("ip", "netns", "exec", app, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 60999")
    dry = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}", "--dry-run")
    assert dry.returncode == 1
    assert "-j EGRESSPROXY_OUTPUT" in dry.stdout
    assert "install would refuse: the proxy's source ports 16384-32767 overlap" in dry.stderr
    assert "net.ipv4.ip_local_reserved_ports=16384-32767" in dry.stderr
    refused = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}")
    assert refused.returncode == 1
    assert "net.ipv4.ip_local_reserved_ports=16384-32767" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert saved_rules(app) == before
    sh(f"ip netns exec {app} sysctl -qw net.ipv4.ip_local_reserved_ports=16384-32767")
    done = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}")
    assert done.returncode == 0, done.stderr


def test_without_net_admin_the_error_says_so(lab: Lab) -> None:
    app = lab.namespace()
    # Root in a user namespace of its own: what a container without NET_ADMIN is.
    done = egressproxy(
        app, "install", f"--proxy-uid={PROXY_UID}", prefix=["unshare", "--user", "--map-root-user"]
    )
    assert done.returncode == 1
    assert "needs CAP_NET_ADMIN (run as root or in an init container with NET_ADMIN)" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_backend_holding_the_rules_stays_theirs(lab: Lab) -> None:
    """Installed through nft; then another tool (Docker, ufw on a legacy host) fills the
    legacy tables. show, install and uninstall still find the rules where they are:
    none of them reports nothing installed, and no second copy goes to legacy."""
    app = lab.namespace()
    before = saved_rules(app)
    first = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}")
    assert first.returncode == 0, first.stderr
    assert "iptables-nft" in first.stdout
    for n in range(1, 16):
        sh(f"ip netns exec {app} iptables-legacy -A INPUT -s 192.0.2.{n} -j ACCEPT")
    with_legacy = saved_rules(app)
    shown = egressproxy(app, "show")
    assert shown.returncode == 0, shown.stderr
    assert "EGRESSPROXY_OUTPUT" in shown.stdout
    again = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}")
    assert again.returncode == 0, again.stderr
    assert "already installed" in again.stdout
    assert saved_rules(app) == with_legacy
    removed = egressproxy(app, "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert "removed" in removed.stdout
    after = saved_rules(app)
    assert all("EGRESSPROXY" not in text for text in after.values())
    nft = [tool for tool in SAVE_TOOLS if "legacy" not in tool]
    assert [after[tool] for tool in nft] == [before[tool] for tool in nft]


def test_ipv4_rules_are_found_beside_an_ipv6_table_of_the_same_name(lab: Lab) -> None:
    """An IPv4-only install in legacy, whose IPv6 nat table holds another tool's rule, then
    more rules in nft: show and uninstall found no rules (the two families' nat tables
    were read as one, IPv6's hiding IPv4's) and left the redirect in place."""
    app = lab.namespace()
    for n in range(1, 4):
        sh(f"ip netns exec {app} iptables-legacy -A INPUT -s 192.0.2.{n} -j DROP")
    sh(f"ip netns exec {app} ip6tables-legacy -t nat -A POSTROUTING -s 2001:db8::1 -j RETURN")
    first = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}", "--no-ipv6")
    assert first.returncode == 0, first.stderr
    assert "iptables-legacy" in first.stdout
    for n in range(1, 13):
        sh(f"ip netns exec {app} iptables-nft -A INPUT -s 198.51.100.{n} -j DROP")
    shown = egressproxy(app, "show")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "EGRESSPROXY_OUTPUT" in shown.stdout
    removed = egressproxy(app, "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == "egressproxy rules removed (IPv4, iptables-legacy)"
    after = saved_rules(app)
    assert all("EGRESSPROXY" not in text for text in after.values())


def test_other_tools_rules_in_any_bytes_are_kept(lab: Lab) -> None:
    """iptables keeps a comment's bytes as given, and one typed in a Latin-1 terminal is
    no UTF-8: install, show and uninstall still work, and keep that rule as it was."""
    app = lab.namespace()
    latin1 = b"B\xfcro".decode("utf-8", "surrogateescape")
    for command in ("iptables", "ip6tables"):
        run("ip", "netns", "exec", app, command, "-A", "INPUT", "-p", "tcp", "--dport", "22",
            "-m", "comment", "--comment", latin1, "-j", "ACCEPT")  # fmt: skip
    before = saved_rules(app)
    assert latin1 in before["iptables-save"]
    first = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}")
    assert first.returncode == 0, first.stderr
    again = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}")
    assert again.returncode == 0, again.stderr
    assert "already installed" in again.stdout
    shown = egressproxy(app, "show")
    assert shown.returncode == 0, shown.stderr
    assert "EGRESSPROXY_OUTPUT" in shown.stdout
    removed = egressproxy(app, "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert saved_rules(app) == before


NET_ADMIN_ONLY = ["setpriv", "--inh-caps=-all", "--bounding-set=-all,+net_admin"]
"""An init container granted NET_ADMIN and nothing else."""


def test_net_admin_alone_installs_with_nft_beside_legacy_tables(lab: Lab) -> None:
    """Legacy's save needs CAP_NET_RAW too (a pod whose kernel has the legacy modules
    loaded may hold its empty tables): the refused probe says why and nft serves."""
    app = lab.namespace()
    sh(f"ip netns exec {app} iptables-legacy -t nat -S")
    done = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}", prefix=NET_ADMIN_ONLY)
    assert done.returncode == 0, done.stderr
    assert "installed (IPv4 and IPv6, iptables-nft)" in done.stdout
    assert "needs CAP_NET_ADMIN and CAP_NET_RAW" in done.stderr
    assert "Traceback" not in done.stderr
    assert "EGRESSPROXY_OUTPUT" in sh(f"ip netns exec {app} iptables-nft-save").stdout


def test_without_iptables_binaries_the_error_says_so(lab: Lab) -> None:
    app = lab.namespace()
    hide_sbin = ["unshare", "--mount", "sh", "-c", HIDE_SBIN, "-"]
    done = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}", prefix=hide_sbin)
    assert done.returncode == 1
    assert "iptables-restore not found: install the iptables package" in done.stderr
    assert "Traceback" not in done.stderr


def failing_ip6tables(directory: Path) -> Path:
    """ip6tables-save of every backend failing, for commands given this PATH alone."""
    for tool in ("ip6tables-save", "ip6tables-nft-save", "ip6tables-legacy-save"):
        fake = directory / tool
        fake.write_text(f"#!/bin/sh\necho '{tool}: no ip6tables here' >&2\nexit 1\n")
        fake.chmod(0o755)
    return directory


@pytest.mark.parametrize(
    ("ipv6", "in_use"),
    [
        ("", ""),
        ("address", "2001:db8:18::1 on epl"),
        ("default route", "a default route"),
    ],
)
def test_ipv6_left_uncaptured_is_warned_when_the_namespace_uses_it(
    lab: Lab, tmp_path: Path, ipv6: str, in_use: str
) -> None:
    """Without a working ip6tables install captures IPv4 only: where IPv6 reaches past
    the links (an address that is not link-local, a default route) it says so loudly;
    `--no-ipv6` accepts the gap, `--ipv6` refuses it."""
    app, peer = lab.namespace(), lab.namespace()
    address = "2001:db8:18::1/64" if ipv6 == "address" else ""
    device, _ = lab.link(app, f"198.18.0.1/24 {address}", peer, "198.18.0.2/24")
    if ipv6 == "default route":
        sh(f"ip -n {app} -6 route add default via fe80::2 dev {device}")
    fake = failing_ip6tables(tmp_path)
    before = saved_rules(app)

    done = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}", path_first=fake)
    assert done.returncode == 0, done.stderr
    assert "installed (IPv4, iptables-nft)" in done.stdout
    after = saved_rules(app)
    assert "EGRESSPROXY_OUTPUT" in after["iptables-nft-save"]
    assert after["ip6tables-nft-save"] == before["ip6tables-nft-save"]
    if in_use:
        assert "WARNING: IPv6 is NOT captured (ip6tables-nft-save failed:" in done.stderr
        assert in_use in done.stderr
        for fix in ("install ip6tables", "net.ipv6.conf.all.disable_ipv6=1", "--no-ipv6"):
            assert fix in done.stderr.lower()
    else:
        assert done.stderr == ""

    acknowledged = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}", "--no-ipv6")
    assert acknowledged.returncode == 0, acknowledged.stderr
    assert acknowledged.stderr == ""
    required = egressproxy(app, "install", f"--proxy-uid={PROXY_UID}", "--ipv6", path_first=fake)
    assert required.returncode == 1
    assert "--ipv6: ip6tables-nft-save failed: ip6tables-nft-save: no ip6tables here" in (
        required.stderr
    )
    assert egressproxy(app, "uninstall").returncode == 0
    assert saved_rules(app) == before


def test_uninstall_and_show_without_ip6tables_say_ipv6_rules_are_left(
    lab: Lab, tmp_path: Path
) -> None:
    """ip6tables gone (or failing) after an install of both families: uninstall removed the
    IPv4 rules, said all was done and left IPv6 captured in silence. Now it says so, as
    show does, and --no-ipv6 says none were made."""
    app = lab.namespace()
    before = saved_rules(app)
    assert egressproxy(app, "install", f"--proxy-uid={PROXY_UID}").returncode == 0
    fake = failing_ip6tables(tmp_path)
    warning = "WARNING: IPv6 rules are not {} (ip6tables-nft-save failed: ip6tables-nft-save:"
    shown = egressproxy(app, "show", path_first=fake)
    assert shown.returncode == 0, shown.stderr
    assert warning.format("shown") in shown.stderr
    removed = egressproxy(app, "uninstall", path_first=fake)
    assert removed.returncode == 0, removed.stderr
    assert warning.format("removed") in removed.stderr and "left in place" in removed.stderr
    left = saved_rules(app)
    assert "EGRESSPROXY_OUTPUT" in left["ip6tables-nft-save"]
    assert "EGRESSPROXY_OUTPUT" not in left["iptables-nft-save"]
    quiet = egressproxy(app, "uninstall", "--no-ipv6", path_first=fake)
    assert (quiet.returncode, "WARNING" in quiet.stderr) == (0, False)
    assert egressproxy(app, "uninstall").returncode == 0
    assert saved_rules(app) == before


if __name__ == "__main__":
    {"serve": serve, "probe": probe}[sys.argv[1]](json.loads(sys.argv[2]))
