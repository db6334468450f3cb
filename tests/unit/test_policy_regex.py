"""Policy regular expressions are RE2's: the syntax Linkerd's proxy and OSM's Envoy accept,
and matching in time linear in the value, whatever the pattern."""

from __future__ import annotations

import re

import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st
from test_policy_linkerd import (
    DENY_NET,
    EXTERNAL,
    compiled,
    http_route,
    line_of,
    request,
    route_problems,
)

from egressproxy.policy.decision import Action, Destination, RequestFacts
from egressproxy.policy.index import compile_policy
from egressproxy.policy.loader import load_policy_text
from egressproxy.policy.regex import Pattern, RegexError
from egressproxy.settings import Settings


def sent(text: str) -> str:
    """text as a request carries it: its UTF-8 bytes, one character per byte."""
    return text.encode().decode("latin-1")


BACKTRACKING = r"/(a+)+b"
"""Python's re tries every split of the a's before it gives up on a value without the b:
2**40 of them for 40 a's."""


def path_route(name: str, pattern: str) -> str:
    return http_route(
        name, f"  - matches:\n    - path: {{type: RegularExpression, value: '{pattern}'}}\n"
    )


@pytest.mark.timeout(30)
def test_a_pattern_that_backtracks_in_python_decides_at_once() -> None:
    """A workload chooses its paths and headers: a careless pattern in the policy must not let
    one request stall the worker (on Python's re these decisions would take hours)."""
    header = "      headers:\n      - {type: RegularExpression, name: x-id, value: '(a|aa)+c'}\n"
    routes = [
        path_route("path", BACKTRACKING),
        http_route("header", f"  - matches:\n    - path: {{value: /h}}\n{header}"),
    ]
    index = compiled("---".join([DENY_NET, *routes]))
    long_run = "a" * 5_000
    assert request(index, f"/{long_run}") == "http-egress-deny"
    assert request(index, f"/{long_run}b") == "path"
    assert request(index, "/h", headers=(("x-id", long_run + "!"),)) == "http-egress-deny"
    assert request(index, "/h", headers=(("x-id", long_run + "c"),)) == "header"


@pytest.mark.parametrize(
    ("pattern", "matching", "other"),
    [
        (r"/users/\pL+", sent("/users/zoë"), "/users/zo3"),
        (r"/v[[:digit:]]+/.*", "/v2/items", "/vx/items"),
        (r"/(?P<id>[0-9]+)", "/42", "/4x"),
        (r"/(?<id>[0-9]+)", "/42", "/4x"),
        (r"/a\z", "/a", "/ab"),
        (r"(?i)/ADMIN", "/admin", "/admins"),
    ],
)
def test_linkerd_syntax_is_accepted(pattern: str, matching: str, other: str) -> None:
    """Unicode and POSIX classes, both forms of named groups and `\\z`, which the Rust regex
    crate of Linkerd's proxy accepts (Python 3.11's re refuses `\\pL`, `(?<id>` and `\\z`, and
    reads `[[:digit:]]` as another set)."""
    index = compiled("---".join([DENY_NET, path_route("r", pattern)]))
    assert request(index, matching) == "r"
    assert request(index, other) == "http-egress-deny"


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("/(?!admin).*", "invalid perl operator: (?!"),
        ("/(?<=x)y", "invalid perl operator: (?<="),
        (r"/(a)\1", "invalid escape sequence: \\1"),
    ],
)
def test_lookaround_and_backreferences_are_refused_with_their_line(
    pattern: str, reason: str
) -> None:
    """Neither RE2 nor the Rust regex crate has them: Linkerd rejects such a route too."""
    document = path_route("r", pattern)
    assert route_problems(document) == [
        (
            line_of(document, "{type: RegularExpression"),
            "HTTPRoute egress-test/r.spec.rules[0].matches[0].path: "
            f"invalid regular expression {pattern!r}: {reason}",
        )
    ]


NATIVE_GRPC_PATTERNS = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  default: deny
  rules:
  - name: g
    ports: [50051]
    grpc: [{serviceRegex: 'pkg\\.\\pL+', methodRegex: '(a+)+b'}]
"""


def test_grpc_name_patterns_are_re2_too() -> None:
    index = compile_policy(load_policy_text(NATIVE_GRPC_PATTERNS, "p.yaml"), Settings())
    destination = Destination(EXTERNAL, 50051)

    def called(path: str) -> str:
        facts = RequestFacts(destination, "example.com", "POST", path, "", (), grpc=True)
        decision = index.decide_request(facts)
        assert decision.route is not None
        return decision.route.name

    assert called("/pkg.Svc/aaab") == "p.g"
    assert called("/pkg.Svc/" + "a" * 5_000) == "grpc-egress-deny"
    assert called("/pkg.5/aaab") == "grpc-egress-deny"


def test_a_lone_surrogate_is_an_error_not_a_crash() -> None:
    with pytest.raises(RegexError, match="not valid Unicode"):
        Pattern("/\ud800")


SIMPLE_PATTERNS_LIST = [
    "a.*",
    "[a-c]+",
    "X|Y",
    "0?1",
    r"\d\d",
    "(?i)abc",
    "blue",
    "a(b|c)*d",
    "[^/]+/x",
    ".?.?",
]
SIMPLE_PATTERNS = st.sampled_from(SIMPLE_PATTERNS_LIST)
"""Where RE2 and Python's re mean the same: literals, classes, alternation, repetition."""


@settings(max_examples=300, deadline=None)
@given(pattern=SIMPLE_PATTERNS, value=st.text("abcdXY01/ éж", max_size=8))
def test_simple_patterns_match_as_pythons_whole_matches(pattern: str, value: str) -> None:
    """A value sent in UTF-8 is matched as its text: `.` is one character, `é` too."""
    assert Pattern(pattern).fullmatch(sent(value)) == (re.fullmatch(pattern, value) is not None)


@settings(max_examples=300, deadline=None)
@given(
    pattern=st.sampled_from(
        [*SIMPLE_PATTERNS_LIST, r"/caf\pL", "[[:alpha:]]+", r"a\z", "", "/get", "/café", "a b"]
    ),
    raw=st.one_of(st.binary(max_size=8), st.sampled_from([b"/get", "/café".encode(), b"a b"])),
)
def test_a_pattern_answers_as_the_re2_module_does(pattern: str, raw: bytes) -> None:
    """Pattern matches through the binding under re2's public API: the same answer for any
    bytes a request carries, those that are no UTF-8 read as U+FFFD, and `.` matching a
    newline too (the module's options)."""
    options = re2.Options()
    options.dot_nl = True
    readable = raw.decode(errors="replace").encode()
    public = re2.compile(pattern.encode(), options).fullmatch(readable) is not None
    assert Pattern(pattern).fullmatch(raw.decode("latin-1")) == public


DENY_ADMIN_AND_ROOT = """\
apiVersion: egressproxy.io/v1alpha1
kind: EgressPolicy
metadata: {name: p}
spec:
  default: allow
  rules:
  - name: no-admin
    action: deny
    http: [{pathRegex: "/admin.*"}]
  - name: no-root
    action: deny
    http: [{headersRegex: {x-user: "root.*"}}]
"""


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/admin/%FF", ()),
        ("/admin/\xff", ()),
        ("/admin/x%E9", ()),
        ("/admin/%E6%97", ()),
        ("/admin/%0Aetc", ()),
        ("/admin/\r", ()),
        ("/public", (("x-user", "root\xff"),)),
        ("/public", (("x-user", "root\xe6\x97\xa5\xff"),)),
    ],
)
def test_bytes_that_are_no_utf8_do_not_get_past_a_deny_pattern(
    path: str, headers: tuple[tuple[str, str], ...]
) -> None:
    """`.` matches every byte a request can carry: one that is not part of any UTF-8
    character, and the newline a decoded `%0A` puts into a path (which `.` would not
    match by default, in RE2 as in Python's re)."""
    index = compiled(DENY_ADMIN_AND_ROOT)
    facts = RequestFacts(Destination(EXTERNAL, 80), "a.example", "GET", path, "", headers, False)
    decision = index.decide_request(facts)
    assert decision.action is Action.DENY, decision
    allowed = RequestFacts(Destination(EXTERNAL, 80), "a.example", "GET", "/public", "", (), False)
    assert index.decide_request(allowed).action is Action.PASS
