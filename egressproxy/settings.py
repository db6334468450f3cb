"""Frozen run-time settings: everything the command line decides, validated once."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_CLUSTER_NETWORKS = "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8"
DEFAULT_OPAQUE_PORTS = "25,587,3306,4444,5432,6379,9300,11211"
PROXY_PORT = 15001
ADMIN_PORT = 4191
MAX_MARK = 2**32 - 1
"""A netfilter mark is 32 bits (SO_MARK, `-m mark`)."""
MAX_WORKERS = 512
"""--workers at most: each worker draws its upstream source ports from its own share of
the 16,384 (upstream.take_worker_share), and below 32 ports a share is walked round
within one connect's tries; past that, a typo (--workers 1000000) forked until the host
ran out of memory or processes."""


class VerifyDestination(enum.Enum):
    OFF = "off"
    LOG = "log"
    ENFORCE = "enforce"


class EchPolicy(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True)
class Endpoint:
    """A HOST:PORT the proxy binds; host is an IP literal ("" never occurs)."""

    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


def host_port(host: str, port: object) -> str:
    """HOST:PORT, an IPv6 literal in brackets so that the port stays apart."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs; ValueError names the bad one. A zone (`fe80::%eth0/64`) is
    refused: ip6tables refuses it too, after the IPv4 rules were committed."""
    networks = []
    for item in text.split(","):
        if not item.strip():
            continue
        network = ipaddress.ip_network(item.strip())
        if isinstance(network, ipaddress.IPv6Network) and network.network_address.scope_id:
            raise ValueError(f"{item.strip()!r} has a zone: a network is written without one")
        networks.append(unmapped_network(network))
    return tuple(networks)


IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def unmapped_network(network: IPNetwork) -> IPNetwork:
    """::ffff:192.0.2.0/120 is 192.0.2.0/24: the addresses an IPv4-mapped network names
    reach iptables and the policy as IPv4 (a dual-stack socket's IPv4 peer included), so
    as IPv6 it would match none of them."""
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= IPV4_MAPPED.prefixlen
        and network.subnet_of(IPV4_MAPPED)
    ):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - IPV4_MAPPED.prefixlen))
    return network


def bundled_policy() -> Path:
    """The package's own allow-all, observe-only policy."""
    return Path(str(resources.files("egressproxy") / "config" / "policy.yaml"))


@dataclass(frozen=True)
class Settings:
    policy_file: Path = field(default_factory=bundled_policy)
    listen: tuple[Endpoint, ...] = ()
    admin: Endpoint = Endpoint("0.0.0.0", ADMIN_PORT)
    workers: int = 1
    namespace: str | None = None
    service_account: str | None = None
    cluster_networks: tuple[IPNetwork, ...] = field(
        default_factory=lambda: parse_networks(DEFAULT_CLUSTER_NETWORKS)
    )
    cluster_domain: str = "cluster.local"
    mark: int | None = None
    sniff_timeout: float = 1.0
    sniff_complete_timeout: float = 10.0
    opaque_ports: frozenset[int] = frozenset(int(p) for p in DEFAULT_OPAQUE_PORTS.split(","))
    egress_namespace: str = "linkerd-egress"
    max_hostnames: int = 1000
    drain_timeout: float = 30.0
    max_connections: int = 10000
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    header_timeout: float = 10.0
    max_header_bytes: int = 65536
    verify_destination: VerifyDestination = VerifyDestination.OFF
    ech: EchPolicy = EchPolicy.ALLOW
    audit: bool = False
    allow_root: bool = False
    log_format: LogFormat = LogFormat.TEXT
    log_level: str = "info"
