"""Command line: argparse into frozen settings and options; the work lives elsewhere."""

from __future__ import annotations

import argparse
import enum
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from egressproxy.policy.errors import DNS_LABEL, DNS_SUBDOMAIN, PORT_DIGITS
from egressproxy.settings import (
    ADMIN_PORT,
    DEFAULT_CLUSTER_NETWORKS,
    DEFAULT_OPAQUE_PORTS,
    MAX_MARK,
    MAX_WORKERS,
    PROXY_PORT,
    EchPolicy,
    Endpoint,
    IPNetwork,
    LogFormat,
    Settings,
    VerifyDestination,
    bundled_policy,
    parse_networks,
)

LOG_LEVELS = ("debug", "info", "warning", "error")
ChoiceT = TypeVar("ChoiceT", bound=enum.Enum)


def policy_path(text: str) -> Path:
    """Path('') is the working directory: `--policy=$FILE` with FILE unset would be
    refused as "Is a directory", naming a file the user never gave."""
    if not text:
        raise argparse.ArgumentTypeError("is empty: name the policy file")
    return Path(text)


def endpoint(text: str) -> Endpoint:
    """HOST:PORT or [V6]:PORT, host an IP literal."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {host!r} is not an IP address") from None
    return Endpoint(str(address), port(port_text))


WHOLE_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")


def port(text: str) -> int:
    if not PORT_DIGITS.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number")
    number = int(text)
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"port {number} is outside 1-65535")
    return number


def port_list(text: str) -> frozenset[int]:
    """Ports and inclusive ranges, `25,8000-8080`, as Linkerd's port lists take them."""
    ports: set[int] = set()
    for item in text.split(","):
        first, dash, last = item.strip().partition("-")
        if not first and not dash:
            continue
        low = port(first.strip())
        high = port(last.strip()) if dash else low
        if high < low:
            raise argparse.ArgumentTypeError(f"{item.strip()!r}: the range ends before it starts")
        ports.update(range(low, high + 1))
    return frozenset(ports)


def network_list(text: str) -> tuple[IPNetwork, ...]:
    try:
        return parse_networks(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(text: str) -> int:
    number = non_negative_int(text)
    if number == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def non_negative_int(text: str) -> int:
    """Decimal, or hexadecimal as marks are often written (0x539); a leading zero is
    decimal, not octal."""
    if text.startswith("-") and WHOLE_NUMBER.fullmatch(text[1:]):
        raise argparse.ArgumentTypeError("must not be negative")
    if not WHOLE_NUMBER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text, 0 if text[1:2] in ("x", "X") else 10)


def worker_count(text: str) -> int:
    number = positive_int(text)
    if number > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{number} is more than the {MAX_WORKERS} allowed")
    return number


MAX_HEADER_BYTES = 8 * 1024 * 1024
"""Envoy's ceiling for request headers (max_request_headers_kb); HTTP/2 carries the limit
in a 32-bit setting, and a head that size is held in memory per connection."""


def header_size(text: str) -> int:
    number = positive_int(text)
    if number > MAX_HEADER_BYTES:
        raise argparse.ArgumentTypeError(f"{number} is more than {MAX_HEADER_BYTES} (8 MiB)")
    return number


def mark(text: str) -> int:
    """A netfilter mark: 32 bits, and 0 is no mark."""
    number = positive_int(text)
    if number > MAX_MARK:
        raise argparse.ArgumentTypeError(
            f"{text!r} does not fit in 32 bits (at most {MAX_MARK:#x})"
        )
    return number


def one_of(kind: type[ChoiceT]) -> Callable[[str], ChoiceT]:
    """An argparse type for an enumeration's values, naming them when one is wrong."""

    def parse(text: str) -> ChoiceT:
        try:
            return kind(text)
        except ValueError:
            allowed = ", ".join(str(member.value) for member in kind)
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {allowed}") from None

    return parse


def values_of(kind: type[enum.Enum]) -> str:
    """The help's {a,b,c} for an enumeration's values."""
    return "{" + ",".join(str(member.value) for member in kind) + "}"


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def default_listeners() -> tuple[Endpoint, ...]:
    v4 = Endpoint("0.0.0.0", PROXY_PORT)
    return (v4, Endpoint("::", PROXY_PORT)) if ipv6_available() else (v4,)


DOMAIN_NAME = re.compile(
    r"(?:[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
)


def namespace_name(text: str) -> str:
    """--egress-namespace: a name no namespace can have (empty, say) would silently make
    the global egress namespace's networks apply to no client."""
    if not DNS_LABEL.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is no namespace name (lower-case letters, digits and '-', at most 63)"
        )
    return text


def domain_name(text: str) -> str:
    """--cluster-domain: what Service backends resolve under, so a DNS name."""
    if len(text) > 253 or not DOMAIN_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is no DNS domain such as cluster.local")
    return text


def client_namespace(text: str) -> str | None:
    """--namespace, empty for unset as in POD_NAMESPACE: `--namespace=$NS` with NS empty
    must not name a namespace "", and no more a name no namespace can have (`Payments`):
    for either no namespace's EgressNetworks apply but the global egress namespace's
    (traffic passing a network that denies it)."""
    if not text:
        return None
    return namespace_name(text)


def service_account_name(text: str) -> str | None:
    """--service-account, empty for unset: a name no service account can have would match
    no OSM Egress `sources` entry, silently."""
    if not text:
        return None
    if len(text) > 253 or not DNS_SUBDOMAIN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is no service account name (lower-case letters, digits, '-' and '.')"
        )
    return text


def add_identity_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", type=client_namespace, default=argparse.SUPPRESS)
    parser.add_argument("--service-account", type=service_account_name, default=argparse.SUPPRESS)
    parser.add_argument(
        "--cluster-networks", type=network_list, default=network_list(DEFAULT_CLUSTER_NETWORKS)
    )
    parser.add_argument("--cluster-domain", type=domain_name, default="cluster.local")
    parser.add_argument("--egress-namespace", type=namespace_name, default="linkerd-egress")


IDENTITY_FROM_ENVIRONMENT: dict[str, tuple[str, Callable[[str], str | None]]] = {
    "namespace": ("POD_NAMESPACE", client_namespace),
    "service_account": ("POD_SERVICE_ACCOUNT", service_account_name),
}
"""Flag → the Downward API variable that stands in for it when it is not given."""


def identity_from_environment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the identity flags not given from the environment; a bad value is blamed on
    the variable, which is what the user must fix, not on a flag never typed, with the
    usage of the command that reads it."""
    for flag, (variable, convert) in IDENTITY_FROM_ENVIRONMENT.items():
        if hasattr(args, flag):
            continue
        try:
            setattr(args, flag, convert(os.environ.get(variable, "")))
        except argparse.ArgumentTypeError as error:
            parser.error(f"environment variable {variable}: {error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egressproxy", description="Transparent egress proxy with Linkerd and OSM policies."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("--policy", type=policy_path, default=None)
    run.add_argument("--listen", type=endpoint, action="append", default=None)
    run.add_argument("--admin", type=endpoint, default=Endpoint("0.0.0.0", ADMIN_PORT))
    run.add_argument("--workers", type=worker_count, default=1)
    add_identity_flags(run)
    run.set_defaults(command_parser=run)
    run.add_argument("--mark", type=mark, default=None)
    run.add_argument("--sniff-timeout", type=seconds, default=1.0)
    run.add_argument("--opaque-ports", type=port_list, default=port_list(DEFAULT_OPAQUE_PORTS))
    run.add_argument("--max-hostnames", type=non_negative_int, default=1000)
    run.add_argument("--drain-timeout", type=seconds, default=30.0)
    run.add_argument("--max-connections", type=positive_int, default=10000)
    run.add_argument("--connect-timeout", type=seconds, default=5.0)
    run.add_argument("--idle-timeout", type=seconds, default=3600.0)
    run.add_argument("--header-timeout", type=seconds, default=10.0)
    run.add_argument("--max-header-bytes", type=header_size, default=65536)
    run.add_argument(
        "--verify-destination",
        type=one_of(VerifyDestination),
        metavar=values_of(VerifyDestination),
        default=VerifyDestination.OFF,
    )
    run.add_argument(
        "--ech", type=one_of(EchPolicy), metavar=values_of(EchPolicy), default=EchPolicy.ALLOW
    )
    run.add_argument("--audit", action="store_true")
    run.add_argument("--allow-root", action="store_true")
    run.add_argument(
        "--log-format", type=one_of(LogFormat), metavar=values_of(LogFormat), default=LogFormat.TEXT
    )
    run.add_argument("--log-level", choices=LOG_LEVELS, default="info")

    check = commands.add_parser("check", help="validate a policy file and explain decisions")
    check.add_argument("--policy", type=policy_path, required=True)
    check.add_argument("--explain", metavar="DEST", default=None)
    add_identity_flags(check)
    check.set_defaults(command_parser=check)

    iptables = commands.add_parser("iptables", help="install the redirect to the proxy")
    iptables.add_argument("action", choices=("install", "uninstall", "show"))
    iptables.add_argument("--mode", choices=("sidecar", "gateway"), default="sidecar")
    iptables.add_argument("--proxy-port", type=port, default=PROXY_PORT)
    iptables.add_argument("--proxy-uid", type=non_negative_int, default=None)
    iptables.add_argument("--proxy-mark", type=positive_int, default=None)
    iptables.add_argument("--exclude-ports", type=port_list, default=frozenset())
    iptables.add_argument("--include-ports", type=port_list, default=frozenset())
    iptables.add_argument("--exclude-cidrs", type=network_list, default=())
    iptables.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=None)
    iptables.add_argument("--block-udp", action="store_true")
    iptables.add_argument("--dry-run", action="store_true")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    command_parser = vars(args).pop("command_parser", None)
    if command_parser is not None:
        identity_from_environment(command_parser, args)
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    common = {
        "policy_file": args.policy or bundled_policy(),
        "namespace": args.namespace,
        "service_account": args.service_account,
        "cluster_networks": args.cluster_networks,
        "cluster_domain": args.cluster_domain,
        "egress_namespace": args.egress_namespace,
    }
    if args.command == "check":
        return Settings(**common)
    return Settings(
        **common,
        listen=tuple(dict.fromkeys(args.listen)) if args.listen else default_listeners(),
        admin=args.admin,
        workers=args.workers,
        mark=args.mark,
        sniff_timeout=args.sniff_timeout,
        opaque_ports=args.opaque_ports,
        max_hostnames=args.max_hostnames,
        drain_timeout=args.drain_timeout,
        max_connections=args.max_connections,
        connect_timeout=args.connect_timeout,
        idle_timeout=args.idle_timeout,
        header_timeout=args.header_timeout,
        max_header_bytes=args.max_header_bytes,
        verify_destination=args.verify_destination,
        ech=args.ech,
        audit=args.audit,
        allow_root=args.allow_root,
        log_format=args.log_format,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "run":
        from egressproxy import server

        return server.main(settings_from(args))
    if args.command == "check":
        from egressproxy.policy import explain

        return explain.run_check(settings_from(args), args.explain)
    from egressproxy.iptables import apply, rules

    options = rules.Options(
        mode=args.mode,
        proxy_port=args.proxy_port,
        proxy_uid=args.proxy_uid,
        proxy_mark=args.proxy_mark,
        exclude_ports=args.exclude_ports,
        include_ports=args.include_ports,
        exclude_cidrs=args.exclude_cidrs,
        ipv6=args.ipv6,
        block_udp=args.block_udp,
    )
    return apply.main(args.action, options, dry_run=args.dry_run)


def entry() -> int:
    """Console entry: a closed stdout (`egressproxy check … | head`) is not an error."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code
