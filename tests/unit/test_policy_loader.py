"""Bad policies: every problem reported as FILE:LINE: reason; only PolicyError escapes."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressproxy.policy import loader
from egressproxy.policy.decision import (
    Action,
    ConnectionFacts,
    Destination,
    Detected,
    RequestFacts,
)
from egressproxy.policy.errors import PolicyError, Problem
from egressproxy.policy.index import compile_policy
from egressproxy.policy.loader import load_policy, load_policy_text
from egressproxy.policy.model import MatchKind, PathMatch, TrafficPolicy
from egressproxy.settings import Settings, bundled_policy

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"

NETWORK = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata:
  namespace: egress-test
  name: all-egress-traffic
spec:
  trafficPolicy: Deny
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    return [str(problem) for problem in caught.value.problems]


def test_policy_error_renders_one_line_per_problem() -> None:
    error = PolicyError([Problem("a.yaml", 3, "first"), Problem("a.yaml", 9, "second")])
    assert str(error) == "a.yaml:3: first\na.yaml:9: second"


def test_unknown_field_has_its_own_line() -> None:
    text = NETWORK + "  trafficPolcy: Allow\n"
    assert problems(text) == [
        "p.yaml:8: EgressNetwork egress-test/all-egress-traffic.spec: unknown field 'trafficPolcy'"
    ]


def test_wrong_type_and_bad_value() -> None:
    text = NETWORK.replace("trafficPolicy: Deny", "trafficPolicy: Maybe\n  networks: 10.0.0.0/8")
    assert problems(text) == [
        "p.yaml:7: EgressNetwork egress-test/all-egress-traffic.spec.trafficPolicy: "
        "'Maybe' is not one of Allow, Deny",
        "p.yaml:8: EgressNetwork egress-test/all-egress-traffic.spec.networks: "
        "expected a list, got the string '10.0.0.0/8'",
    ]


def test_bad_cidr() -> None:
    text = NETWORK + "  networks:\n  - cidr: 10.0.0.0/33\n    except: [nonsense]\n"
    found = problems(text)
    assert found[0].startswith("p.yaml:9: ") and "'10.0.0.0/33' is not a CIDR" in found[0]
    assert found[1].startswith("p.yaml:10: ") and "'nonsense' is not a CIDR" in found[1]


@pytest.mark.parametrize(
    "networks",
    [
        "  networks:\n  - cidr: ''\n",
        "  networks:\n  - cidr: ''\n    except: [10.0.0.0/8]\n",
    ],
)
@pytest.mark.parametrize(
    "header",
    [
        NETWORK,
        "apiVersion: egressproxy.io/v1alpha1\nkind: EgressPolicy\nmetadata:\n"
        "  name: p\n  namespace: egress-test\nspec:\n  default: deny\n",
    ],
    ids=["linkerd", "native"],
)
def test_an_empty_cidr_is_an_error(header: str, networks: str) -> None:
    """An empty cidr (a template value left blank) was dropped: the Deny network covered
    nothing, and its traffic passed untouched."""
    found = problems(header + networks)
    assert len(found) == 1 and found[0].startswith("p.yaml:9: "), found
    assert found[0].endswith(".spec.networks[0].cidr: '' is not a CIDR")


def test_networks_are_checked_as_linkerds_admission_webhook_checks_them() -> None:
    """`networks: []` made a network covering nothing, which in the client's namespace hid
    the global namespace's networks: all its egress passed untouched. An exception outside
    its cidr excepted nothing; one covering the whole cidr left the entry covering nothing.
    Linkerd's webhook refuses all three."""
    assert problems(NETWORK + "  networks: []\n") == [
        "p.yaml:8: EgressNetwork egress-test/all-egress-traffic.spec.networks: at least one "
        "network must be specified, as Linkerd's admission webhook says (omit networks for "
        "everything outside the cluster networks)"
    ]
    text = (
        NETWORK
        + "  networks:\n"
        + "  - cidr: 203.0.113.0/24\n    except: [198.51.100.0/24, 203.0.113.128/25]\n"
        + "  - cidr: 192.0.2.0/24\n    except: [192.0.0.0/16]\n"
        + "  - cidr: 2001:db8::/32\n    except: [203.0.113.0/24]\n"
    )
    where = "EgressNetwork egress-test/all-egress-traffic.spec.networks"
    assert problems(text) == [
        f"p.yaml:10: {where}[0].except: 198.51.100.0/24 is not inside cidr 203.0.113.0/24",
        f"p.yaml:12: {where}[1].except: 192.0.0.0/16 covers all of cidr 192.0.2.0/24: "
        "the entry covers nothing",
        f"p.yaml:14: {where}[2].except: 203.0.113.0/24 is not inside cidr 2001:db8::/32",
    ]


ROUTE = """\
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: HTTPRoute
metadata:
  name: httpbin-get
  namespace: egress-test
spec:
  parentRefs:
    - name: all-egress-trafic
      kind: EgressNetwork
      group: policy.linkerd.io
      port: 80
  rules:
    - matches:
      - path:
          value: "/get"
"""


def test_dangling_parent_every_error_reported() -> None:
    other = ROUTE.replace("port: 80", "sectionName: x").replace("httpbin-get", "httpbin-ip")
    found = problems(NETWORK + ROUTE + other)
    assert found == [
        "p.yaml:16: HTTPRoute egress-test/httpbin-get.spec.parentRefs[0]: "
        "EgressNetwork egress-test/all-egress-trafic does not exist in this policy",
        "p.yaml:32: HTTPRoute egress-test/httpbin-ip.spec.parentRefs[0]: "
        "port is required for an EgressNetwork parent (as in Linkerd)",
    ]


def test_a_required_port_left_empty_is_missing() -> None:
    """An empty `port:` is null, which Kubernetes takes for an unset field: the parentRef's
    port is missing, and so is a Service backendRef's (it must not go to the original
    destination instead of the Service)."""
    route = ROUTE.replace("all-egress-trafic", "all-egress-traffic")
    assert problems(NETWORK + route.replace("port: 80", "port:")) == [
        "p.yaml:16: HTTPRoute egress-test/httpbin-get.spec.parentRefs[0]: "
        "port is required for an EgressNetwork parent (as in Linkerd)",
    ]
    backend = route + "      backendRefs:\n      - {kind: Service, name: internal, port: }\n"
    assert problems(NETWORK + backend) == [
        "p.yaml:25: HTTPRoute egress-test/httpbin-get.spec.rules[0].backendRefs[0]: "
        "port is required for a Service backendRef",
    ]


@pytest.mark.parametrize("text", ["", "# all commented out\n", "---\n---\n"])
def test_a_policy_without_documents_is_refused(text: str) -> None:
    """A file emptied or truncated by mistake would pass every connection untouched."""
    assert problems(text) == [
        "p.yaml:1: the policy has no documents: to let all traffic through, say so"
        " (config/policy.yaml allows everything)"
    ]


@pytest.mark.parametrize(
    "text",
    [
        'apiVersion: v1\nitems: []\nkind: List\nmetadata:\n  resourceVersion: ""\n',
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: List\n  items: []\n",
    ],
)
def test_a_list_without_items_is_refused_as_no_documents(text: str) -> None:
    """`kubectl get egressnetworks -A -o yaml > policy.yaml` where there are none: the
    List stands for no resource, and was taken as a valid policy of no network, which
    lets every connection through, at start-up and on reload."""
    assert problems(text) == [
        "p.yaml:1: the policy has no documents (its List has no items): to let all traffic"
        " through, say so (config/policy.yaml allows everything)"
    ]


@pytest.mark.parametrize("written", ["0x" + "f" * 4000, "0b" + "1" * 20000, "0" + "7" * 5000])
def test_a_huge_number_is_an_error_not_a_traceback(written: str) -> None:
    """YAML reads 0x… of any length, and Python will not write an integer of more than
    4,300 digits: the message about its type raised instead of reporting it."""
    text = NETWORK.replace("trafficPolicy: Deny", f"trafficPolicy: Deny\n  networks: {written}")
    assert problems(text) == [f"p.yaml:8: YAML value {written[:20]!r}…: too large a number"]


def test_a_lone_surrogate_is_no_text() -> None:
    """`"\\ud800"` is valid YAML but no Unicode text: refused at its line (it broke the
    summary's print with a traceback)."""
    text = NETWORK.replace("name: all-egress-traffic", 'name: "a\\ud800b"')
    assert problems(text)[0] == "p.yaml:5: YAML value 'a\\ud800b': not valid Unicode"


@pytest.mark.parametrize(
    ("api_version", "kind"),
    [
        ("policy.linkerd.com/v1alpha1", "EgressNetwork"),
        ("v1alpha1", "EgressNetwork"),
        ("policy.linkerd.io/v1alpha1", "egressnetwork"),
        ("policy.linkerd.io/v1alpha1", "EgresNetwork"),
        ("policy.linkerd.io/v1alpha1", "EgressNetworks"),
    ],
)
def test_a_network_kind_in_another_group_or_case_is_an_error(api_version: str, kind: str) -> None:
    """Skipped as a kind of no egress meaning, a Deny network with a typo in its apiVersion
    or kind would let all its traffic through."""
    text = NETWORK.replace("policy.linkerd.io/v1alpha1", api_version).replace(
        "kind: EgressNetwork", f"kind: {kind}"
    )
    assert problems(text) == [
        f"p.yaml:1: {kind} of apiVersion {api_version!r} is no kind egressproxy reads (it"
        " reads EgressNetwork of policy.linkerd.io/v1alpha1): skipped, its network would let"
        " the traffic it covers through"
    ]


@pytest.mark.parametrize(
    ("api_version", "kind", "meant"),
    [
        ("egressproxy.io/v1alpha1", "EgresPolicy", "EgressPolicy of egressproxy.io/v1alpha1"),
        ("egressproxy.io/v1alpha1", "EgressRule", "EgressPolicy of egressproxy.io/v1alpha1"),
        ("egressproxy.io/v1alpha1", "EgressPolicies", "EgressPolicy of egressproxy.io/v1alpha1"),
        (
            "config.openservicemesh.io/v1alpha2",
            "MeshConfg",
            "MeshConfig of config.openservicemesh.io",
        ),
    ],
)
def test_a_misspelt_network_kind_is_an_error(api_version: str, kind: str, meant: str) -> None:
    """A typo in a network kind made it a kind of no egress meaning, skipped with an info
    line: the policy's Deny vanished, and everything passed. egressproxy.io has one kind, so
    any other in it is a mistake."""
    text = f"apiVersion: {api_version}\nkind: {kind}\nmetadata:\n  name: p\nspec: {{}}\n"
    [found] = problems(text)
    assert found.startswith(f"p.yaml:1: {kind} of apiVersion {api_version!r} is no kind"), found
    assert f"(it reads {meant}" in found


@pytest.mark.parametrize(
    ("api_version", "kind"),
    [
        ("policy.openservicemesh.io/v1alpha1", "IngressBackend"),
        ("v1", "ConfigMap"),
        ("gwin.yandex.cloud/v1", "IngressPolicy"),  # as like EgressPolicy as a typo (0.88)
        ("policy.linkerd.io/v1beta3", "Server"),
    ],
)
def test_other_kinds_are_still_skipped(
    api_version: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    text = NETWORK + f"---\napiVersion: {api_version}\nkind: {kind}\nmetadata:\n  name: p\n"
    with caplog.at_level(logging.INFO):
        load_policy_text(text, "p.yaml")
    assert f"p.yaml:10: skipping {kind}: no egress meaning" in caplog.messages


def test_unsupported_filter_is_an_error() -> None:
    route = ROUTE.replace("all-egress-trafic", "all-egress-traffic") + (
        "      filters:\n      - type: RequestMirror\n        requestMirror: {}\n"
    )
    assert problems(NETWORK + route) == [
        "p.yaml:25: HTTPRoute egress-test/httpbin-get.spec.rules[0].filters[0]: "
        "HTTPRoute filter RequestMirror is not supported"
    ]


def test_linkerds_timeout_and_retry_annotations_are_errors() -> None:
    """Linkerd gives an EgressNetwork's or a route's traffic timeouts and retries by these
    annotations; ignored, a request it would cut off or retry was silently neither, while
    rule `timeouts` and `retry` are already refused. A route for no EgressNetwork (skipped)
    may keep them."""
    network = NETWORK.replace(
        "  name: all-egress-traffic\n",
        "  name: all-egress-traffic\n  annotations:\n    retry.linkerd.io/http: 5xx\n",
    )
    route = ROUTE.replace("all-egress-trafic", "all-egress-traffic").replace(
        "  namespace: egress-test\n",
        "  namespace: egress-test\n  annotations: {timeout.linkerd.io/request: 5s}\n",
    )
    for_a_service = route.replace("name: httpbin-get", "name: in-cluster").replace(
        "kind: EgressNetwork", "kind: Service"
    )
    assert problems(network + route + for_a_service) == [
        "p.yaml:7: EgressNetwork egress-test/all-egress-traffic: annotation "
        "retry.linkerd.io/http is not supported by egressproxy (Linkerd's retries; remove it)",
        "p.yaml:16: HTTPRoute egress-test/httpbin-get: annotation timeout.linkerd.io/request "
        "is not supported by egressproxy (Linkerd's timeouts; remove it)",
    ]


def test_linkerds_opaque_ports_annotation_on_a_network_is_an_error() -> None:
    """Linkerd never protocol-detects the ports an EgressNetwork's annotation lists; ignored,
    their traffic was sniffed (a server-first protocol waited --sniff-timeout, HTTP met
    the HTTPRoutes) where the user had asked for opaque TCP."""
    network = NETWORK.replace(
        "  name: all-egress-traffic\n",
        '  name: all-egress-traffic\n  annotations: {config.linkerd.io/opaque-ports: "8080"}\n',
    )
    assert problems(network) == [
        "p.yaml:6: EgressNetwork egress-test/all-egress-traffic: annotation "
        "config.linkerd.io/opaque-ports is not supported by egressproxy: list the ports in "
        "--opaque-ports (for every network)"
    ]


TLS_ROUTE_ON_443 = """\
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: tls, namespace: egress-test}
spec:
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 443}
"""
"""A TLSRoute on port 443 of NETWORK, its rules still to come."""


def test_a_tls_or_tcp_route_has_a_single_rule() -> None:
    """TLSRoute and TCPRoute rules match nothing of their own: the first took every
    connection and the others were silently unused. Linkerd's webhook refuses more than
    one."""
    route = (
        TLS_ROUTE_ON_443
        + """\
  rules:
  - backendRefs: [{name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io}]
  - backendRefs: [{name: internal-egress, port: 443}]
"""
    )
    assert problems(NETWORK + route + route.replace("TLSRoute", "TCPRoute")) == [
        "p.yaml:17: TLSRoute egress-test/tls.spec.rules[1]: a TLSRoute has a single rule, as "
        "Linkerd's admission webhook says (the first would take every connection)",
        "p.yaml:27: TCPRoute egress-test/tls.spec.rules[1]: a TCPRoute has a single rule, as "
        "Linkerd's admission webhook says (the first would take every connection)",
    ]


def test_a_tls_or_tcp_route_without_rules_is_an_error() -> None:
    """The Gateway API CRDs require a TLSRoute's and a TCPRoute's rules, at least one:
    Kubernetes refuses such a route, so it never reaches a cluster's proxies. Accepted,
    it let every connection of its port through, which no pasted manifest can mean."""
    empty = TLS_ROUTE_ON_443.replace("kind: TLSRoute", "kind: TCPRoute") + "  rules: []\n"
    assert problems(NETWORK + TLS_ROUTE_ON_443 + empty) == [
        "p.yaml:12: TLSRoute egress-test/tls.spec.rules: missing or empty: a TLSRoute needs "
        "its one rule (the Gateway API CRD requires at least one; Kubernetes would refuse "
        "the object)",
        "p.yaml:22: TCPRoute egress-test/tls.spec.rules: missing or empty: a TCPRoute needs "
        "its one rule (the Gateway API CRD requires at least one; Kubernetes would refuse "
        "the object)",
    ]


def test_service_backend_port_must_exist() -> None:
    service = "---\napiVersion: v1\nkind: Service\nmetadata: {name: svc, namespace: egress-test}\n"
    service += "spec:\n  ports:\n  - port: 8080\n"
    route = ROUTE.replace("all-egress-trafic", "all-egress-traffic") + (
        "      backendRefs:\n      - {kind: Service, name: svc, port: 80}\n"
    )
    assert problems(NETWORK + service + route) == [
        "p.yaml:32: HTTPRoute egress-test/httpbin-get.spec.rules[0].backendRefs[0]: "
        "Service egress-test/svc has no port 80"
    ]


def backends(*refs: str) -> str:
    """ROUTE, attached, with these backendRefs (flow mappings) on its rule."""
    route = ROUTE.replace("all-egress-trafic", "all-egress-traffic")
    return route + "      backendRefs:\n" + "".join(f"      - {ref}\n" for ref in refs)


PARENT_BACKEND = "kind: EgressNetwork, group: policy.linkerd.io, name: all-egress-traffic"


def test_a_rule_whose_every_backend_weighs_zero_is_an_error() -> None:
    """Gateway API: weight 0 forwards no traffic for that entry, and Linkerd's proxy drops
    such backends (an empty distribution never becomes ready): the rule must not pass
    traffic to the original destination as if no weight were there."""
    assert problems(NETWORK + backends(f"{{{PARENT_BACKEND}, weight: 0}}")) == [
        "p.yaml:24: HTTPRoute egress-test/httpbin-get.spec.rules[0].backendRefs: every "
        "backendRef has weight 0: the rule forwards no traffic, which is not supported"
    ]


def test_backend_weight_outside_the_crd_range_is_an_error() -> None:
    assert problems(NETWORK + backends(f"{{{PARENT_BACKEND}, weight: -5}}")) == [
        "p.yaml:25: HTTPRoute egress-test/httpbin-get.spec.rules[0].backendRefs[0].weight: "
        "-5 is outside 0-1000000"
    ]
    assert problems(NETWORK + backends(f"{{{PARENT_BACKEND}, weight: 1000001}}")) == [
        "p.yaml:25: HTTPRoute egress-test/httpbin-get.spec.rules[0].backendRefs[0].weight: "
        "1000001 is outside 0-1000000"
    ]


def test_zero_weight_backends_beside_one_that_weighs_are_left_out() -> None:
    """Only the backends that weigh count as traffic splitting."""
    text = NETWORK + backends(
        "{kind: Service, name: svc, port: 80, weight: 0}", f"{{{PARENT_BACKEND}, weight: 1}}"
    )
    (rule,) = load_policy_text(text, "p.yaml").routes[0].rules
    assert (rule.action, rule.backend) == (Action.PASS, None), "to the EgressNetwork alone"
    text = NETWORK + backends(
        "{kind: Service, name: svc, port: 80, weight: 2}", f"{{{PARENT_BACKEND}, weight: 1}}"
    )
    assert problems(text) == [
        "p.yaml:24: HTTPRoute egress-test/httpbin-get.spec.rules[0].backendRefs: "
        "2 backends: traffic splitting is not supported"
    ]


def test_an_egress_network_backend_of_a_route_with_two_parents_is_an_error() -> None:
    """Linkerd's controller gives an EgressNetwork backend to the parent of that name only,
    and the route's traffic of any other parent an invalid backend, which fails it: it
    went to its original destination here, past that other network's Deny."""
    second = NETWORK.replace("all-egress-traffic", "other-egress")
    route = backends(f"{{{PARENT_BACKEND}}}").replace(
        "  rules:",
        "    - {name: other-egress, kind: EgressNetwork, group: policy.linkerd.io, port: 80}\n"
        "  rules:",
    )
    text = NETWORK + "---\n" + second + route
    line = text.splitlines().index(f"      - {{{PARENT_BACKEND}}}") + 1
    assert problems(text) == [
        f"p.yaml:{line}: HTTPRoute egress-test/httpbin-get.spec.rules[0].backendRefs[0]: "
        "backendRef EgressNetwork egress-test/all-egress-traffic serves that parent only: "
        "Linkerd gives the route's traffic of its other parents (egress-test/other-egress) an "
        "invalid backend, which fails it; attach the route to one EgressNetwork"
    ]


def test_yaml_syntax_error_uses_the_mark() -> None:
    assert problems(NETWORK + "  networks: [\n") == [
        "p.yaml:9: YAML syntax: expected the node content, but found '<stream end>'"
    ]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "absent.yaml")
    assert str(caught.value).endswith(
        "absent.yaml: cannot read the policy: No such file or directory"
    )


def test_unsupported_version_of_a_used_kind() -> None:
    text = NETWORK.replace("v1alpha1", "v9")
    assert problems(text) == [
        "p.yaml:1: EgressNetwork: apiVersion 'policy.linkerd.io/v9' is not supported "
        "(use policy.linkerd.io/v1alpha1)"
    ]


def test_other_kinds_are_skipped_with_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="egressproxy.policy.loader")
    model = load_policy(EXAMPLES / "linkerd-5-redirect.yaml")
    assert len(model.networks) == 1 and len(model.routes) == 3
    skipped = [record.getMessage() for record in caplog.records]
    assert len(skipped) == 1 and "skipping Deployment" in skipped[0]


KUBECTL_LIST = """\
apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: policy.linkerd.io/v1alpha1
  kind: EgressNetwork
  metadata:
    namespace: egress-test
    name: all-egress-traffic
  spec:
    trafficPolicy: Deny
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata:
    namespace: egress-test
    name: httpbin-get
  spec:
    parentRefs:
    - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 80}
    rules:
    - matches: [{path: {value: /get}}]
"""


def test_a_kubectl_list_applies_its_items() -> None:
    """`kubectl get egressnetworks,httproutes -o yaml` writes one v1 List: its resources
    apply, as `kubectl apply` would apply them, rather than the List being skipped."""
    index = compile_policy(load_policy_text(KUBECTL_LIST, "p.yaml"), Settings())

    def decide(path: str) -> Action:
        destination = Destination(ipaddress.ip_address("203.0.113.5"), 80)
        facts = RequestFacts(destination, "httpbin.org", "GET", path, "", (), grpc=False)
        return index.decide_request(facts).action

    assert decide("/get") is Action.PASS
    assert decide("/post") is Action.DENY


def test_a_list_item_that_is_no_mapping_is_an_error() -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n- just text\n"
    assert problems(text) == [
        "p.yaml:4: List.items[0]: expected a mapping, got the string 'just text'"
    ]


def test_every_example_and_the_bundled_policy_load() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert len(files) >= 8
    for file in [*files, bundled_policy()]:
        compile_policy(load_policy(file), Settings())


def test_a_duplicate_key_is_an_error_and_a_network_given_twice_the_last_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key twice in one mapping is a mistake (kubectl refuses it too); an object given
    twice is what `kubectl apply` of the file would hold: the last one, with a warning."""
    assert problems(NETWORK + "  trafficPolicy: Allow\n") == [
        "p.yaml:8: duplicate key 'trafficPolicy'"
    ]
    allow = NETWORK.replace("trafficPolicy: Deny", "trafficPolicy: Allow")
    assert allow != NETWORK
    with caplog.at_level(logging.WARNING):
        model = load_policy_text(NETWORK + "---\n" + allow, "p.yaml")
    assert [network.traffic_policy for network in model.networks] == [TrafficPolicy.ALLOW]
    assert (
        "p.yaml:9: EgressNetwork egress-test/all-egress-traffic is given again (first at line 1)"
        in caplog.text
    )


def test_alias_bomb_and_recursion_are_policy_errors() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefgh":
        previous = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [{', '.join([f'*{previous}'] * 10)}]\n"
    assert problems(bomb) == ["p.yaml:1: YAML aliases expand the policy by more than 200000 nodes"]
    assert problems("&a [*a]")[0] == "p.yaml:1: recursive YAML alias"
    assert problems("[" * 5000 + "]" * 5000) == ["p.yaml:1: YAML nesting is too deep"]


def test_only_what_aliases_repeat_counts_against_their_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long policy written out (100,000 CIDRs) is no alias bomb: it was refused as one
    once its nodes passed the limit meant for expansion."""
    monkeypatch.setattr(loader, "MAX_ALIAS_NODES", 50)
    written = NETWORK.replace("Deny\n", "Deny\n  networks:\n") + "".join(
        f"  - cidr: 198.51.100.{host}/32\n" for host in range(100)
    )
    assert len(load_policy_text(written, "p.yaml").networks[0].ranges or ()) == 100
    repeated = written + "  - &entry {cidr: 203.0.113.0/24}\n" + "  - *entry\n" * 51
    assert problems(repeated) == [
        "p.yaml:109: YAML aliases expand the policy by more than 50 nodes",  # the anchor
    ]


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        (NETWORK + "  x: " + "[" * 5000 + "]" * 5000 + "\n", range(8, 9)),
        (NETWORK + "---\n" + NETWORK + "  x: " + "{a: " * 5000 + "}" * 5000 + "\n", range(16, 17)),
        (NETWORK + "".join("  " * depth + "k:\n" for depth in range(1, 3000)), range(100, 3007)),
    ],
)
def test_nesting_too_deep_is_reported_where_it_is(text: str, lines: range) -> None:
    """Not at line 1 of the file, which is no help in a long one. (Block nesting is cut
    where Python's stack ends, some hundreds of lines in.)"""
    [problem] = problems(text)
    line, reason = problem.removeprefix("p.yaml:").split(": ", 1)
    assert int(line) in lines and reason == "YAML nesting is too deep"


def test_a_forbidden_character_is_one_problem_at_its_line() -> None:
    """PyYAML's message adds a second line, a character position: no FILE:LINE: line."""
    assert problems(NETWORK + "  x: a\x00b\n") == ["p.yaml:8: YAML: unacceptable character #x0000"]


def test_merge_keys_merge_as_kubectl_reads_them() -> None:
    """`<<: *base` is YAML 1.1's merge, which kubectl applies: the mapping's own keys win,
    then the merged mappings in order. It was refused as an unknown tag."""
    text = NETWORK.replace("Deny\n", "Deny\n  networks:\n") + (
        "  - &wide {cidr: 198.51.100.0/24, except: [198.51.100.7/32]}\n"
        "  - &other {cidr: 203.0.113.0/24, except: [203.0.113.9/32]}\n"
        "  - <<: *wide\n"
        "    cidr: 198.51.100.0/25\n"
        "  - <<: [*other, *wide]\n"
    )
    ranges = load_policy_text(text, "p.yaml").networks[0].ranges or ()
    assert [(str(r.cidr), [str(e) for e in r.excepts]) for r in ranges] == [
        ("198.51.100.0/24", ["198.51.100.7/32"]),
        ("203.0.113.0/24", ["203.0.113.9/32"]),
        ("198.51.100.0/25", ["198.51.100.7/32"]),
        ("203.0.113.0/24", ["203.0.113.9/32"]),
    ]
    merged_field = NETWORK.replace("Deny\n", "Deny\n  networks:\n") + (
        "  - &base {cidr: 198.51.100.0/24, bogus: 1}\n  - <<: *base\n"
    )
    where = "EgressNetwork egress-test/all-egress-traffic.spec.networks"
    assert problems(merged_field) == [
        f"p.yaml:9: {where}[0]: unknown field 'bogus'",
        f"p.yaml:9: {where}[1]: unknown field 'bogus'",
    ]
    for value in ("5", "[5]", ""):
        assert problems(NETWORK + f"  <<: {value}\n") == [
            "p.yaml:8: a merge key (<<) takes a mapping or a list of mappings"
        ]


def test_a_required_field_left_empty_is_missing_at_its_own_line() -> None:
    text = NETWORK.replace("  trafficPolicy: Deny\n", "  networks: []\n  trafficPolicy:\n")
    assert problems(text)[-1] == (
        "p.yaml:8: EgressNetwork egress-test/all-egress-traffic.spec: "
        "missing required field 'trafficPolicy'"
    )


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("namespace", "Egress-Test", "is no namespace name"),
        ("namespace", "egress.test", "is no namespace name"),
        ("namespace", "a" * 64, "is no namespace name"),
        ("name", "All_Egress", "is no object name Kubernetes accepts"),
        ("name", "-all", "is no object name Kubernetes accepts"),
        ("name", "a" * 254, "is no object name Kubernetes accepts"),
    ],
)
def test_a_name_kubernetes_refuses_is_an_error(field: str, value: str, said: str) -> None:
    """The API server refuses them, so no cluster has them; here a namespace spelled so
    (`Egress-Test`) silently applied to no client, and the network's Deny to no one."""
    text = NETWORK.replace(
        "namespace: egress-test" if field == "namespace" else "name: all-egress-traffic",
        f"{field}: {value}",
    )
    line = 4 if field == "namespace" else 5
    [problem] = problems(text)
    assert problem.startswith(f"p.yaml:{line}: EgressNetwork.metadata.{field}: {value!r} {said} (")


def test_names_kubernetes_accepts_load() -> None:
    for field, value in [("name", "a.b-c"), ("name", "a" * 253), ("namespace", "a" * 63)]:
        text = NETWORK.replace(
            "namespace: egress-test" if field == "namespace" else "name: all-egress-traffic",
            f"{field}: {value}",
        )
        assert load_policy_text(text, "p.yaml").networks
    empty = NETWORK.replace("namespace: egress-test", "namespace: ''")
    assert load_policy_text(empty, "p.yaml").networks[0].id.namespace == "default"


def test_a_policy_is_read_no_further_than_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/dev/zero, or a multi-gigabyte log given by mistake, would fill memory."""
    with pytest.raises(PolicyError) as caught:
        load_policy(Path("/dev/zero"))
    assert str(caught.value) == "/dev/zero: the policy is larger than 16 MiB"
    monkeypatch.setattr(loader, "MAX_POLICY_BYTES", len(NETWORK))
    policy = tmp_path / "p.yaml"
    policy.write_text(NETWORK)
    assert load_policy(policy).networks
    policy.write_text(NETWORK + "\n")
    with pytest.raises(PolicyError, match="larger than"):
        load_policy(policy)


YAML_TEXT = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "apiVersion",
                    "kind",
                    "metadata",
                    "spec",
                    "name",
                    "namespace",
                    "trafficPolicy",
                    "networks",
                    "cidr",
                    "parentRefs",
                    "rules",
                    "port",
                    "matches",
                    "path",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)

KIND_HEADS = st.sampled_from(
    [
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: EgressNetwork\n",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n",
        "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\n",
        "apiVersion: policy.openservicemesh.io/v1alpha1\nkind: Egress\n",
        "apiVersion: config.openservicemesh.io/v1alpha2\nkind: MeshConfig\n",
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\n",
        "apiVersion: egressproxy.io/v1alpha1\nkind: EgressPolicy\n",
        "apiVersion: v1\nkind: Service\n",
        "",
    ]
)


def only_policy_errors(text: str) -> None:
    try:
        model = load_policy_text(text, "fuzz.yaml")
    except PolicyError as error:
        assert all(isinstance(problem, Problem) for problem in error.problems)
        assert error.problems
        return
    index = compile_policy(model, Settings(namespace="egress-test"))
    destination = Destination(ipaddress.ip_address("203.0.113.7"), 80)
    index.decide_connection(ConnectionFacts(destination, Detected.TLS, "a.example.com"))
    index.decide_request(RequestFacts(destination, "a.example.com", "GET", "/", "", (), grpc=False))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_arbitrary_text_gives_model_or_policy_error(text: str) -> None:
    only_policy_errors(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(KIND_HEADS, YAML_TEXT)
def test_arbitrary_structures_give_model_or_policy_error(head: str, body: object) -> None:
    dumped = yaml.safe_dump(body, default_flow_style=False) if body is not None else ""
    only_policy_errors(head + dumped if isinstance(body, dict) else head + "spec: " + dumped)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="&*[]{}:-!|>'\"\n #%@`,?ab", max_size=80))
def test_yaml_punctuation_gives_model_or_policy_error(text: str) -> None:
    only_policy_errors(text)


def test_a_route_given_twice_is_the_last_one_in_the_first_ones_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The API server holds one route per group, kind, namespace and name, and `kubectl
    apply` of a file naming one twice keeps the last: egressproxy applied both (the first
    copy's rules still allowed what the second no longer does), then refused the file. The
    last is used, in the first one's place (its age among routes); the same name in
    another kind or group is another object."""
    route = """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: egress-test}
spec:
  parentRefs:
  - {name: all-egress-traffic, kind: EgressNetwork, group: policy.linkerd.io, port: 80}
  rules:
  - matches: [{path: {type: PathPrefix, value: /get}}]
"""
    other_kinds = route.replace("kind: HTTPRoute", "kind: GRPCRoute").replace(
        "rules:\n  - matches: [{path: {type: PathPrefix, value: /get}}]", "rules: [{}]"
    ) + route.replace("gateway.networking.k8s.io/v1", "policy.linkerd.io/v1beta3")
    again = route.replace("/get", "/post")
    with caplog.at_level(logging.WARNING):
        model = load_policy_text(NETWORK + route + other_kinds + again, "p.yaml")
    assert "p.yaml:35: HTTPRoute egress-test/web is given again (first at line 9)" in caplog.text
    kinds = [(route.ref.group, route.ref.kind, route.order) for route in model.routes]
    assert kinds == [
        ("gateway.networking.k8s.io", "HTTPRoute", 1),
        ("gateway.networking.k8s.io", "GRPCRoute", 2),
        ("policy.linkerd.io", "HTTPRoute", 3),
    ]
    web = model.routes[0]
    assert [str(match.path) for rule in web.rules for match in rule.http_matches] == [
        str(PathMatch(MatchKind.PREFIX, "/post"))
    ]


def test_a_bad_annotation_value_is_reported_at_its_own_line() -> None:
    """An annotation's error points at the annotation, not at the document it is in."""
    network = NETWORK.replace(
        "  name: all-egress-traffic\n",
        "  name: all-egress-traffic\n  annotations:\n    egressproxy.io/audit: maybe\n"
        "    egressproxy.io/verify-destination: sometimes\n",
    )
    assert problems(network) == [
        "p.yaml:7: EgressNetwork egress-test/all-egress-traffic.spec: annotation "
        'egressproxy.io/audit must be "true" or "false"',
        "p.yaml:8: EgressNetwork egress-test/all-egress-traffic.spec: annotation "
        "egressproxy.io/verify-destination must be one of off, log, enforce",
    ]
