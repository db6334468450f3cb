"""`egressproxy check`: exit codes, FILE:LINE on stderr, and --explain's answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from egressproxy import cli
from egressproxy.policy.explain import run_check
from egressproxy.settings import Settings
from tests.unit.test_policy_linkerd import TCP_ROUTE_ON_443
from tests.unit.test_startup import NOBODY, REPO

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"
STEP5 = EXAMPLES / "linkerd-5-redirect.yaml"
STEP5_SKIPS = "26: skipping Deployment: no egress meaning"
"""The info line for the guide's Deployment (line 26), on stderr."""


OPAQUE_DEFAULTS = (
    "; --opaque-ports 25, 587, 3306, 4444, 5432, 6379, 9300, 11211: everything → tcp-egress-deny"
)
"""The end of a Deny network's `otherwise:` line: the default --opaque-ports are never
sniffed, so everything there is other traffic."""


def check(
    capsys: pytest.CaptureFixture[str],
    policy: Path,
    explain: str | None = None,
    namespace: str | None = "egress-test",
) -> tuple[int, str, str]:
    status = run_check(Settings(policy_file=policy, namespace=namespace), explain)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_valid_policy_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = check(capsys, STEP5)
    assert (status, err) == (0, f"{STEP5}:{STEP5_SKIPS}\n")
    assert "EgressNetwork egress-test/all-egress-traffic" in out
    assert (
        "port 80 (HTTP, else http-egress-deny):"
        " HTTPRoute egress-test/httpbin-get; HTTPRoute egress-test/unencrypted-http" in out
    )
    assert (
        "port 443 (TLS, else tls-egress-deny; anything but TLS with a server name denied):"
        " TLSRoute egress-test/tls-egress" in out
    )
    assert (
        "otherwise: HTTP and gRPC → http-egress-deny, TLS and other traffic → tcp-egress-deny"
        f"{OPAQUE_DEFAULTS}\n" in out
    )
    assert len(out.splitlines()) < 25


def test_summary_marks_routes_the_ports_protocol_leaves_unused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(STEP5.read_text() + TCP_ROUTE_ON_443)
    status, out, err = check(capsys, mixed)
    assert (status, err) == (0, f"{mixed}:{STEP5_SKIPS}\n")
    assert (
        "port 443 (TLS, else tls-egress-deny; anything but TLS with a server name denied):"
        " TLSRoute egress-test/tls-egress;"
        " TCPRoute egress-test/anything (unused: the port's TLS routes take precedence)"
    ) in out


def test_summary_names_the_protocol_of_each_native_rule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A native rule with hosts and no protocol is a TLS route by SNI and an HTTP route by
    Host; the summary tells the two apart."""
    status, out, _ = check(capsys, EXAMPLES / "native-1-allowlist.yaml")
    assert status == 0
    github = "EgressRule standalone.github [github.com, *.github.com]"
    assert f"port 443: {github} (TLS); {github} (HTTP)" in out
    assert (
        "port 5432 (in --opaque-ports: never sniffed, else tcp-egress-deny):"
        " EgressRule standalone.database (TCP); EgressRule standalone.database (HTTP)"
        " (never matches: the port is not sniffed)\n" in out
    )


@pytest.mark.parametrize(
    ("example", "otherwise", "tls_elsewhere"),
    [
        (
            "native-1-allowlist.yaml",
            "HTTP and gRPC → http-egress-deny, TLS → tls-egress-deny,"
            " other traffic → tcp-egress-deny;"
            " port 50051: gRPC → grpc-egress-deny" + OPAQUE_DEFAULTS,
            "tls-egress-deny",  # every port has the TLS rule of *.debian.org
        ),
        (
            "osm-3-egress-policy.yaml",
            "HTTP and gRPC → http-egress-deny, TLS and other traffic → tcp-egress-deny;"
            " port 443: TLS → tls-egress-deny" + OPAQUE_DEFAULTS,
            "tcp-egress-deny",
        ),
    ],
)
def test_summary_names_the_default_route_of_each_kind_of_unmatched_traffic(
    capsys: pytest.CaptureFixture[str], example: str, otherwise: str, tls_elsewhere: str
) -> None:
    """The defaults decide_* pick: TLS gets tls-egress-* on a port with TLS rules and no
    TCP ones, gRPC gets grpc-egress-* only on a port with gRPC rules."""
    policy = EXAMPLES / example
    status, out, _ = check(capsys, policy, namespace=None)
    assert status == 0
    assert f"  otherwise: {otherwise}\n" in out
    for destination, route in [
        ("https://example.org/", "tls-egress-deny"),
        ("tls://example.org:8443", tls_elsewhere),
        ("grpc://example.org:9000/pkg.Service/Method", "http-egress-deny"),
        ("tcp://198.51.100.7:5432", "tcp-egress-deny"),
    ]:
        _, explained, _ = check(capsys, policy, destination, namespace=None)
        assert f"route:       default {route}" in explained


def test_summary_names_the_grpc_default_of_a_port_with_grpc_rules_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """No HTTP rule on the port: every request there is decided as gRPC."""
    policy = tmp_path / "grpc.yaml"
    policy.write_text(
        "apiVersion: egressproxy.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: g}\n"
        "spec:\n  default: deny\n  rules:\n  - name: greeter\n    hosts: [grpc.example.com]\n"
        "    ports: [9000]\n    grpc:\n    - service: helloworld.Greeter\n"
    )
    status, out, _ = check(capsys, policy)
    assert status == 0
    assert out.endswith(f"; port 9000: HTTP and gRPC → grpc-egress-deny{OPAQUE_DEFAULTS}\n")
    _, explained, _ = check(capsys, policy, "http://example.org:9000/")
    assert "route:       default grpc-egress-deny" in explained


def test_explain_shows_a_native_grpc_regex_rule_matching(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """serviceRegex / methodRegex decide an --explain grpc:// call as the proxy would."""
    policy = tmp_path / "grpc-regex.yaml"
    policy.write_text(
        "apiVersion: egressproxy.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: g}\n"
        "spec:\n  default: deny\n  rules:\n  - name: greeter-reads\n    ports: [9000]\n"
        "    grpc:\n    - serviceRegex: 'helloworld\\.Greet(er|ings)'\n"
        "      methodRegex: 'Get.*'\n"
    )
    destination = "grpc://api.example.com:9000/helloworld.Greetings/GetAll"
    status, explained, err = check(capsys, policy, destination)
    assert (status, err) == (0, "")
    assert "route:       EgressRule g.greeter-reads\n" in explained
    assert f"why:         matched EgressRule g.greeter-reads rule greeter-reads ({policy}:7)\n" in (
        explained
    )
    _, explained, _ = check(capsys, policy, destination.replace("GetAll", "SetAll"))
    assert "route:       default grpc-egress-deny\n" in explained


def test_summary_marks_another_namespaces_consumer_route(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    consumer = tmp_path / "consumer.yaml"
    consumer.write_text(
        """apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {namespace: linkerd-egress, name: global}
spec: {trafficPolicy: Deny}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: team-a, name: team-a-allow}
spec:
  parentRefs:
  - {name: global, namespace: linkerd-egress, kind: EgressNetwork, group: policy.linkerd.io,
     port: 80}
"""
    )
    status, out, _ = check(capsys, consumer)
    assert status == 0
    assert (
        "port 80: HTTPRoute team-a/team-a-allow"
        " (not for this client: a route in team-a serves its clients only)"
    ) in out


def test_summary_marks_routes_another_namespaces_route_kind_leaves_unused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A GRPCRoute of team-a on the port conflicts the producer's HTTPRoute for every
    client (Linkerd's RouteReasonConflicted), team-b's too, which that GRPCRoute does not serve."""
    conflicted = tmp_path / "conflicted.yaml"
    conflicted.write_text(
        """apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {namespace: linkerd-egress, name: global}
spec: {trafficPolicy: Deny}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: linkerd-egress, name: allow-get}
spec:
  parentRefs:
  - {name: global, kind: EgressNetwork, group: policy.linkerd.io, port: 80}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {namespace: team-a, name: team-a-grpc}
spec:
  parentRefs:
  - {name: global, namespace: linkerd-egress, kind: EgressNetwork, group: policy.linkerd.io,
     port: 80}
"""
    )
    status, out, _ = check(capsys, conflicted, namespace="team-b")
    assert status == 0
    assert (
        "port 80: HTTPRoute linkerd-egress/allow-get"
        " (unused: the port's GRPC routes take precedence);"
        " GRPCRoute team-a/team-a-grpc (not for this client: a route in team-a serves its"
        " clients only)"
    ) in out


def test_skipped_documents_get_an_info_line_each(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pasted = tmp_path / "pasted.yaml"
    pasted.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: egress-test}\n---\n")
    with pasted.open("a") as policy:
        policy.write(STEP5.read_text())
    status, out, err = check(capsys, pasted)
    assert status == 0
    assert err.splitlines() == [
        f"{pasted}:2: skipping Namespace: no egress meaning",
        f"{pasted}:30: skipping Deployment: no egress meaning",
    ]
    assert "EgressNetwork egress-test/all-egress-traffic" in out


def test_invalid_policy_lists_every_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        STEP5.read_text()
        .replace("trafficPolicy: Deny", "trafficPolicy: Deny\n  colour: red")
        .replace("port: 443", "port: https")
    )
    status, out, err = check(capsys, broken)
    assert (status, out) == (1, "")
    skipped, *lines = err.splitlines()
    assert skipped == f"{broken}:27: skipping Deployment: no egress meaning"
    assert len(lines) == 2
    assert (
        lines[0]
        == f"{broken}:10: EgressNetwork egress-test/all-egress-traffic.spec: unknown field 'colour'"
    )
    assert (
        lines[1].startswith(f"{broken}:")
        and "expected an integer, got the string 'https'" in lines[1]
    )
    assert "Traceback" not in err


def test_a_directory_is_named_without_a_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An unreadable file has no line to point at: `FILE: reason`, not a line 0."""
    status, _, err = check(capsys, tmp_path)
    assert (status, err) == (1, f"{tmp_path}: cannot read the policy: Is a directory\n")


def test_missing_file_and_syntax_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, _, err = check(capsys, tmp_path / "absent.yaml")
    assert (status, err) == (
        1,
        f"{tmp_path / 'absent.yaml'}: cannot read the policy: No such file or directory\n",
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: EgressNetwork\nspec: {trafficPolicy: Allow\n")
    status, _, err = check(capsys, bad)
    assert status == 1 and err.startswith(f"{bad}:3: YAML syntax:")


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("https://httpbin.org/get", ["route:       TLSRoute egress-test/tls-egress", "PASS"]),
        (
            "http://google.com/",
            [
                "route:       HTTPRoute egress-test/unencrypted-http",
                "ROUTE to internal-egress.egress-test.svc.cluster.local:80",
                "google.com is not resolved",
            ],
        ),
        ("http://httpbin.org/get", ["HTTPRoute egress-test/httpbin-get", "rule rules[0]"]),
        ("tcp://203.0.113.5:5432", ["route:       default tcp-egress-deny", "action:      DENY"]),
        ("grpc://api.example.com:9000/pkg.Service/Method", ["default http-egress-deny"]),
        ("tcp://10.0.0.1:80", ["network:     none (not egress)", "PASS"]),
    ],
)
def test_explain(capsys: pytest.CaptureFixture[str], destination: str, expected: list[str]) -> None:
    status, out, err = check(capsys, STEP5, destination)
    assert (status, err) == (0, f"{STEP5}:{STEP5_SKIPS}\n")
    for fragment in expected:
        assert fragment in out
    if "egress-test" in out:
        assert 'parent_name="all-egress-traffic"' in out


NATIVE_DENIES = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  default: allow
  rules:
  - {name: block-host, hosts: [evil.test], action: deny}
  - {name: block-net, cidrs: [198.51.100.0/24], action: deny}
"""


@pytest.mark.parametrize(
    ("destination", "data_plane"),
    [
        ("https://evil.test./", "the SNI evil.test. is decided as evil.test"),
        ("http://evil.test./", "the Host evil.test. is decided as evil.test"),
        ("tcp://[::ffff:198.51.100.9]:22", "::ffff:198.51.100.9 is decided as 198.51.100.9"),
    ],
)
def test_explain_decides_as_the_data_plane_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, destination: str, data_plane: str
) -> None:
    """Explain kept the root label's dot and the IPv4-mapped form that the data plane takes
    off, and answered PASS for traffic the data plane denies."""
    policy = tmp_path / "native.yaml"
    policy.write_text(NATIVE_DENIES)
    status, out, _ = check(capsys, policy, destination)
    assert status == 0
    assert "action:      DENY" in out, f"{data_plane}:\n{out}"


def test_explain_decides_an_opaque_port_as_opaque_tcp(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The data plane never sniffs a port in --opaque-ports, so an HTTPRoute on it
    decides nothing: --explain says what the traffic would get, not what HTTP would."""
    policy = tmp_path / "opaque.yaml"
    policy.write_text(
        """apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {namespace: egress-test, name: all}
spec: {trafficPolicy: Deny}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: egress-test, name: r}
spec:
  parentRefs: [{name: all, kind: EgressNetwork, group: policy.linkerd.io, port: 3306}]
"""
    )
    status, out, _ = check(capsys, policy, "http://db.example.com:3306/")
    assert status == 0
    assert "port:        in --opaque-ports: never sniffed, decided as opaque TCP" in out
    assert "route:       default tcp-egress-deny" in out
    assert "action:      DENY (tcp)" in out
    status, out, _ = check(capsys, policy)  # and the summary says so (it said HTTP)
    assert (
        "  port 3306 (in --opaque-ports: never sniffed, else tcp-egress-deny):"
        " HTTPRoute egress-test/r (never matches: the port is not sniffed)\n" in out
    )


def test_explain_decides_an_osm_tcp_server_first_port_as_opaque_tcp(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An http Egress for foo.com beside a tcp-server-first Egress on its port: OSM's
    Envoy inspects nothing there, so HTTP for foo.com takes no http chain."""
    policy = tmp_path / "osm.yaml"
    policy.write_text(
        """apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {name: osm-mesh-config, namespace: osm-system}
spec: {traffic: {enableEgress: false}}
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: {name: web, namespace: curl}
spec:
  sources: [{kind: ServiceAccount, name: curl, namespace: curl}]
  hosts: [foo.com]
  ports: [{number: 8000, protocol: http}]
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: {name: banner, namespace: curl}
spec:
  sources: [{kind: ServiceAccount, name: curl, namespace: curl}]
  ipAddresses: [198.51.100.0/24]
  ports: [{number: 8000, protocol: tcp-server-first}]
"""
    )
    status, out, _ = check(capsys, policy, "http://foo.com:8000/", namespace="curl")
    assert status == 0
    assert "port:        an OSM tcp-server-first port: never sniffed, decided as opaque TCP" in out
    assert "action:      DENY" in out, "no http chain for an address no tcp chain covers"
    status, out, _ = check(capsys, policy, "http://198.51.100.7:8000/", namespace="curl")
    assert "route:       Egress curl/banner" in out and "action:      PASS" in out
    status, out, _ = check(capsys, policy, namespace="curl")
    assert (
        "  port 8000 (an OSM tcp-server-first port: never sniffed, else tcp-egress-deny):"
        " Egress curl/web [foo.com] (HTTP) (never matches: the port is not sniffed);"
        " Egress curl/banner (TCP)\n"
    ) in out


def test_explain_asks_for_brackets_around_an_ipv6_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It said the port was not a number (which a user and password before the host do
    not change)."""
    status, out, err = check(capsys, STEP5, "tcp://2001:db8::1:5432")
    assert (status, out) == (2, "")
    assert err.splitlines()[-1].endswith(": an IPv6 address goes in brackets: [2001:db8::1]:443")
    status, out, err = check(capsys, STEP5, "https://user:pw@example.com:99999")
    assert (status, out) == (2, "")
    assert err.splitlines()[-1].endswith(": the port is not a number from 1 to 65535")


@pytest.mark.parametrize(
    "destination",
    ["ftp://x/", "tcp://203.0.113.5", "http:///nohost", "http://h:99999/", "http://h:0/"],
)
def test_explain_rejects_bad_destinations(
    capsys: pytest.CaptureFixture[str], destination: str
) -> None:
    status, out, err = check(capsys, STEP5, destination)
    assert status == 2 and out == ""
    assert err.splitlines()[-1].startswith("egressproxy check: --explain")


@pytest.mark.parametrize(
    ("cluster", "said"),
    [
        ("", "  networks: everything (--cluster-networks is empty)"),
        ("0.0.0.0/0,::/0", "every documentation address is inside --cluster-networks"
                           " (0.0.0.0/0, ::/0)"),
        ("192.0.2.0/24,198.51.100.0/24,203.0.113.0/24,2001:db8::/32",
         "every documentation address is inside --cluster-networks (192.0.2.0/24,"
         " 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32)"),
    ],
)  # fmt: skip
def test_the_cluster_networks_are_named_as_given(
    capsys: pytest.CaptureFixture[str], cluster: str, said: str
) -> None:
    """An empty list printed "everything outside " and nothing; a list that holds every
    address the explanation may assume was reported as 0.0.0.0/0, which was not given."""
    args = ["check", "--policy", str(STEP5), f"--cluster-networks={cluster}"]
    status = cli.main([*args, "--explain", "https://example.com/"] if "inside" in said else args)
    captured = capsys.readouterr()
    assert status == (2 if "inside" in said else 0)
    assert said in (captured.err if "inside" in said else captured.out)


def test_identity_flags_fall_back_on_the_downward_api_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "curl")
    monkeypatch.setenv("POD_SERVICE_ACCOUNT", "curl-sa")
    settings = cli.settings_from(cli.parse_args(["check", "--policy", str(STEP5)]))
    assert (settings.namespace, settings.service_account) == ("curl", "curl-sa")
    given = cli.parse_args(["run", "--namespace", "web", "--service-account="])
    assert (given.namespace, given.service_account) == ("web", None)


def test_an_empty_policy_path_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Path('') is the working directory: it was refused as ".: Is a directory"."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["check", "--policy="])
    assert exited.value.code == 2
    assert "argument --policy: is empty: name the policy file" in capsys.readouterr().err


def test_a_file_it_may_not_read_is_named_without_a_line(tmp_path: Path) -> None:
    """Run as nobody (the suite runs as root, which may read anything)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(STEP5.read_text())
    policy.chmod(0)
    checked = subprocess.run(
        [sys.executable, "-m", "egressproxy", "check", "--policy", str(policy)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        user=NOBODY,
    )
    assert (checked.returncode, checked.stderr) == (
        1,
        f"{policy}: cannot read the policy: Permission denied\n",
    )


NATIVE_ROUTE = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata:
  name: standalone
spec:
  default: allow
  rules:
  - hosts: [app.example.com]
    action: route
    to: "{target}"
"""


def test_a_route_target_that_is_no_host_is_refused_at_its_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = tmp_path / "native.yaml"
    policy.write_text(NATIVE_ROUTE.format(target="not a host!:80"))
    status, _, err = check(capsys, policy)
    assert status == 1
    assert f"{policy}:10: EgressPolicy standalone.spec.rules[0].to: 'not a host!'" in err


def test_explain_names_a_native_network_without_a_namespace(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = tmp_path / "native.yaml"
    policy.write_text(NATIVE_ROUTE.format(target="[2001:db8::1]:8080"))
    status, out, _ = check(capsys, policy, "http://app.example.com/")
    assert status == 0
    assert "network:     EgressPolicy standalone\n" in out
    assert "ROUTE to [2001:db8::1]:8080" in out


NATIVE_REGEX_MATCHES = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: standalone}
spec:
  default: allow
  rules:
  - name: no-paging
    http: [{queryRegex: {page: "[0-9]+"}}]
    action: deny
  - name: greeter
    ports: [9000]
    grpc: [{service: pkg.Greeter, headersRegex: {content-type: 'application/grpc(\\+proto)?'}}]
    action: deny
"""


@pytest.mark.parametrize(
    ("destination", "route"),
    [
        ("http://app.example.com/list?page=12", "EgressRule standalone.no-paging"),
        ("http://app.example.com/list?page=12a", "default http-egress-allow"),
        ("grpc://app.example.com:9000/pkg.Greeter/Hello", "EgressRule standalone.greeter"),
        ("grpc://app.example.com:9000/pkg.Other/Hello", "default grpc-egress-allow"),
    ],
)
def test_explain_shows_native_regular_expression_matches(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, destination: str, route: str
) -> None:
    """The explained request's query, and a gRPC call's content-type, meet queryRegex and
    headersRegex like any other match."""
    policy = tmp_path / "native.yaml"
    policy.write_text(NATIVE_REGEX_MATCHES)
    status, out, _ = check(capsys, policy, destination)
    assert status == 0
    assert f"route:       {route}\n" in out
    assert ("action:      DENY" in out) == route.startswith("EgressRule")


def test_summary_marks_an_egress_whose_sources_are_other_clients(
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy = EXAMPLES / "osm-5-egress-routegroup.yaml"
    status = run_check(Settings(policy_file=policy, namespace="other", service_account="x"), None)
    out = capsys.readouterr().out
    assert status == 0
    assert (
        "port 80: Egress curl/httpbin-80 [httpbin.org] (HTTP)"
        " (not for this client: its sources are curl/curl)\n"
    ) in out
    run_check(Settings(policy_file=policy, namespace="curl", service_account="curl"), None)
    assert "port 80: Egress curl/httpbin-80 [httpbin.org] (HTTP)\n" in capsys.readouterr().out


def test_explain_says_which_hosts_an_osm_http_port_takes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """OSM's Envoy domains are HOST and HOST:PORT: the explanation of a request to an OSM
    http port says so (a URL cannot name a Host port other than the one it goes to); a
    Linkerd port, whose hostnames match any port, gets no such line."""
    osm = EXAMPLES / "osm-3-egress-policy.yaml"
    status, out, _ = check(capsys, osm, "http://httpbin.org:80/get", namespace=None)
    assert status == 0
    assert (
        "host:        OSM Egress hosts on port 80 match Host httpbin.org or httpbin.org:80,"
        " never httpbin.org with another port\n"
    ) in out
    assert "route:       Egress curl/httpbin-80\n" in out
    status, out, _ = check(capsys, EXAMPLES / "linkerd-3-httproute.yaml", "http://httpbin.org/get")
    assert status == 0
    assert "host:" not in out


def test_explain_matches_an_address_in_host_as_the_data_plane_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """OSM takes an IPv4 address in hosts, matched against Host on http ports, and the
    data plane reads `Host: 203.0.113.9` as that host: explain read no host from an
    address and said the request was denied, while curl's got through."""
    policy = tmp_path / "address.yaml"
    policy.write_text(
        (EXAMPLES / "osm-3-egress-policy.yaml").read_text().replace("httpbin.org", "203.0.113.9")
    )
    status, out, _ = check(capsys, policy, "http://203.0.113.9/get", namespace=None)
    assert status == 0
    assert "hostname:    203.0.113.9\n" in out
    assert "route:       Egress curl/httpbin-80\n" in out
    assert "action:      PASS to the original destination (http)\n" in out


FIXED_PORTS_ON_AN_ALLOW_NETWORK = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {namespace: ns, name: net}
spec: {trafficPolicy: Allow}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {namespace: ns, name: g}
spec:
  parentRefs: [{name: net, kind: EgressNetwork, group: policy.linkerd.io, port: 80}]
  rules: [{matches: [{method: {service: a.B}}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {namespace: ns, name: t}
spec:
  hostnames: [httpbin.org]
  parentRefs: [{name: net, kind: EgressNetwork, group: policy.linkerd.io, port: 443}]
  rules: [{}]
"""


def test_the_summary_says_what_a_fixed_port_of_an_allow_network_denies(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A port of GRPCRoutes denies HTTP that is no gRPC call, a port of TLSRoutes anything
    but TLS, on an Allow network too: the summary said only `else grpc-egress-allow`."""
    policy = tmp_path / "fixed.yaml"
    policy.write_text(FIXED_PORTS_ON_AN_ALLOW_NETWORK)
    status, out, _ = check(capsys, policy, namespace="ns")
    assert status == 0
    assert (
        "  port 80 (GRPC, else grpc-egress-allow; HTTP that is no gRPC call denied): "
        "GRPCRoute ns/g\n"
    ) in out
    assert (
        "  port 443 (TLS, else tls-egress-allow; anything but TLS with a server name denied): "
        "TLSRoute ns/t [httpbin.org]\n"
    ) in out
    for destination in ("http://example.com/get", "tcp://203.0.113.5:443"):
        status, out, _ = check(capsys, policy, destination, namespace="ns")
        assert (status, "action:      DENY" in out) == (0, True), out


def test_the_summary_says_a_tls_route_port_never_sniffed_denies_all(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Connections to a port in --opaque-ports are opaque, and a port of TLSRoutes refuses
    what is not TLS, on an Allow network too: the summary said `else tcp-egress-allow`."""
    policy = tmp_path / "fixed.yaml"
    policy.write_text(FIXED_PORTS_ON_AN_ALLOW_NETWORK.replace("port: 443", "port: 5432"))
    status, out, _ = check(capsys, policy, namespace="ns")
    assert status == 0
    assert (
        "  port 5432 (in --opaque-ports: never sniffed, so all denied: tls-egress-deny):"
        " TLSRoute ns/t [httpbin.org] (never matches: the port is not sniffed)\n"
    ) in out
    assert "; --opaque-ports 25, 587, 3306, 4444, 6379, 9300, 11211: everything →" in out
    status, out, _ = check(capsys, policy, "tcp://203.0.113.5:5432", namespace="ns")
    assert "route:       default tls-egress-deny" in out and "action:      DENY" in out


def test_check_refuses_an_osm_star_host_at_its_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`hosts: ["*"]` on the guide's http and https Egresses: one FILE:LINE error each."""
    star = tmp_path / "star.yaml"
    text = (EXAMPLES / "osm-3-egress-policy.yaml").read_text().replace("- httpbin.org", '- "*"')
    star.write_text(text)
    status, out, err = check(capsys, star, namespace=None)
    assert (status, out) == (1, "")
    errors = [line for line in err.splitlines() if "'*' allows nothing" in line]
    star_lines = [number for number, line in enumerate(text.splitlines(), 1) if '"*"' in line]
    assert [line.split(": Egress ")[0] for line in errors] == [
        f"{star}:{number}" for number in star_lines
    ]
    assert "on http port 80" in errors[0] and "on https port 443" in errors[1]
    assert "Traceback" not in err


def test_check_says_egress_policies_are_off_by_the_feature_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """featureFlags.enableEgressPolicy false: the summary says the MeshConfig's Egress
    policies are off and where, and so does --explain of a host an Egress lists."""
    policy = tmp_path / "osm.yaml"
    text = (EXAMPLES / "osm-3-egress-policy.yaml").read_text()
    policy.write_text(
        text.replace(
            "    enableEgress: false\n",
            "    enableEgress: false\n  featureFlags:\n    enableEgressPolicy: false\n",
        )
    )
    line = policy.read_text().splitlines().index("    enableEgressPolicy: false") + 1
    off = f"Egress policies are off: featureFlags.enableEgressPolicy is false at {policy}:{line}"
    status, out, err = check(capsys, policy, namespace=None)
    assert status == 0
    assert f"{policy}: valid, 1 network(s), 0 route(s)\n" in out
    assert f"  {off}\n" in out
    assert "featureFlags.enableEgressPolicy is false: its 2 Egress policies are not applied" in err
    status, out, _ = check(capsys, policy, "http://httpbin.org/get", namespace=None)
    assert status == 0
    assert "route:       default http-egress-deny\n" in out
    assert (
        "why:         no HTTPRoute matched on port 80 of MeshConfig osm-system/osm-mesh-config:"
        f" default Deny ({off})\n" in out
    )


def test_explain_asks_about_the_bytes_a_client_sends(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A path typed with `é` (or with `%C3%A9`) is decided as curl's request for it is: by
    its UTF-8, which is what a rule's `/café` is compared with."""
    policy = tmp_path / "native.yaml"
    policy.write_text(
        "apiVersion: egressproxy.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: p}\n"
        "spec:\n  default: deny\n  rules:\n  - name: cafe\n    hosts: [a.example]\n"
        "    http: [{path: /café}]\n"
    )
    for destination in ("http://a.example/café", "http://a.example/caf%C3%A9"):
        _, out, _ = check(capsys, policy, destination)
        assert "route:       EgressRule p.cafe\n" in out, destination
    _, out, _ = check(capsys, policy, "http://a.example/caf%E9")
    assert "route:       default http-egress-deny\n" in out


IDN_POLICY = """\
apiVersion: config.openservicemesh.io/v1alpha2
kind: MeshConfig
metadata: {name: osm-mesh-config, namespace: osm-system}
spec: {traffic: {enableEgress: false}}
---
apiVersion: policy.openservicemesh.io/v1alpha1
kind: Egress
metadata: {name: books, namespace: curl}
spec:
  sources: [{kind: ServiceAccount, name: curl, namespace: curl}]
  hosts: [xn--bcher-kva.example, kube.example]
  ports: [{number: 80, protocol: http}]
  matches: [{apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: by-host}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: by-host, namespace: curl}
spec:
  matches: [{name: any, pathRegex: ".*", headers: {host: "(xn--|k).*"}}]
"""


@pytest.mark.parametrize("host", ["bücher.example", "\u212aube.example"])
def test_explain_sends_a_unicode_host_as_curl_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, host: str
) -> None:
    """In IDNA (`bücher.example` is `xn--bcher-kva.example`), Host header included, which
    OSM's `host` header match reads; the Kelvin sign is a k there."""
    policy = tmp_path / "osm.yaml"
    policy.write_text(IDN_POLICY)
    run = run_check(
        Settings(policy_file=policy, namespace="curl", service_account="curl"),
        f"http://{host}/",
    )
    out = capsys.readouterr().out
    assert run == 0, out
    assert "action:      PASS" in out, out


def test_an_empty_identity_flag_is_unset_as_an_empty_environment_variable_is(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`--namespace=$NS` with NS empty: no namespace named "" that owns nothing, so that a
    network denying all egress stops applying (every namespace's resources apply, as the
    summary says and as POD_NAMESPACE="" has it)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: EgressNetwork\n"
        "metadata: {namespace: app, name: deny-all}\nspec: {trafficPolicy: Deny}\n"
    )
    explain = ["check", "--policy", str(policy), "--namespace=", "--explain", "https://x.com/"]
    assert cli.main(explain) == 0
    out = capsys.readouterr().out
    assert "network:     EgressNetwork app/deny-all" in out
    assert "action:      DENY (tcp)" in out
    for command in ("check", "run"):
        args = cli.parse_args(
            [command, "--policy", str(policy), "--namespace=", "--service-account="]
        )
        settings = cli.settings_from(args)
        assert settings.namespace is None and settings.service_account is None
