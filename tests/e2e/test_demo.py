"""The demo (scripts/demo.py) replays the Linkerd guide and leaves nothing behind.

Its output is read here as a newcomer reads it: each step's curl results and the
metric samples printed under it must show the guide's outcome.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo.py"
DEMO_TIMEOUT = 90.0
INTERRUPT_TIMEOUT = 30.0
SAMPLE = re.compile(
    r"^(?P<family>\w+)\{\n(?P<labels>(?:  \w+=\".*\",?\n)*)\} (?P<value>\d+)$", re.M
)
LABEL = re.compile(r'(\w+)="(.*)"')
STEP_HEADING = re.compile(r"^━━━ Step (\d)/5: ", re.M)


def preflight() -> None:
    if os.geteuid() != 0:
        pytest.fail("the demo needs root (network namespaces, iptables, setpriv)", pytrace=False)


def demo_command() -> list[str]:
    return [sys.executable, str(DEMO)]


def demo_environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def steps_of(output: str) -> dict[int, str]:
    """Step number to the text printed under its heading."""
    headings = list(STEP_HEADING.finditer(output))
    ends = [heading.start() for heading in headings[1:]] + [output.index("━━━ Cleanup")]
    return {
        int(heading[1]): output[heading.start() : end]
        for heading, end in zip(headings, ends, strict=True)
    }


def samples_in(text: str) -> list[tuple[str, dict[str, str], int]]:
    return [
        (match["family"], dict(LABEL.findall(match["labels"])), int(match["value"]))
        for match in SAMPLE.finditer(text)
    ]


def has_sample(text: str, family: str, **labels: str) -> bool:
    return any(
        name == family and labels.items() <= found.items() and value >= 1
        for name, found, value in samples_in(text)
    )


def leftovers(pid: int) -> list[str]:
    """What a demo run with this PID could have left: namespaces, hosts files, workdirs, proxy."""
    names = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    found = [name for name in names.split() if name in (f"epdemo-cli-{pid}", f"epdemo-net-{pid}")]
    found += [str(path) for path in Path("/etc/netns").glob(f"epdemo-*-{pid}")]
    found += [str(path) for path in Path("/tmp").glob(f"egressproxy-demo-{pid}-*")]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"egressproxy-demo-{pid}-" in command:
            found.append(f"process {cmdline.parent.name}: {command}")
    return found


def test_demo_replays_every_step_of_the_linkerd_guide() -> None:
    preflight()
    started = time.monotonic()
    process = subprocess.Popen(
        demo_command(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=demo_environment(),
        cwd=REPO,
    )
    try:
        output_bytes, _ = process.communicate(timeout=DEMO_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = output_bytes.decode(errors="replace")
    assert process.returncode == 0, output
    assert time.monotonic() - started < DEMO_TIMEOUT
    assert "NOT AS THE GUIDE SAYS" not in output, output
    assert "demo passed" in output

    steps = steps_of(output)
    assert sorted(steps) == [1, 2, 3, 4, 5], output
    http = "outbound_http_route_request_statuses_total"

    allow = steps[1]
    assert "HTTP/1.1 200 OK" in allow
    assert has_sample(
        allow, http, route_name="http-egress-allow", hostname="httpbin.org", http_status="200"
    ), allow

    deny = steps[2]
    assert "HTTP/1.1 403" in deny and "traffic not allowed" in deny
    assert has_sample(
        deny, http, route_name="http-egress-deny", hostname="httpbin.org", http_status="403"
    ), deny
    assert not has_sample(deny, http, http_status="200"), deny

    httproute = steps[3]
    assert has_sample(
        httproute,
        http,
        route_kind="HTTPRoute",
        route_name="httpbin-get",
        hostname="httpbin.org",
        http_status="200",
        error="",
    ), httproute
    assert re.search(r"https://httpbin\.org/get\n  curl: \(\d+\)", httproute), httproute
    assert has_sample(
        httproute,
        "outbound_tcp_route_close_total",
        route_name="tcp-egress-deny",
        parent_port="443",
        error="forbidden",
    ), httproute

    tlsroute = steps[4]
    assert re.search(r"https://httpbin\.org/get\n  HTTP/1.1 200 OK", tlsroute), tlsroute
    assert re.search(r"https://github\.com\n  curl: \(\d+\)", tlsroute), tlsroute
    assert has_sample(
        tlsroute,
        "outbound_tls_route_open_total",
        route_kind="TLSRoute",
        route_name="tls-egress",
        hostname="httpbin.org",
    ), tlsroute
    assert has_sample(
        tlsroute,
        "outbound_tls_route_close_total",
        route_kind="default",
        route_name="tls-egress-deny",
        hostname="github.com",
        error="forbidden",
    ), tlsroute

    redirect = steps[5]
    assert re.search(r"https://github\.com\n  HTTP/1.1 200 OK", redirect), redirect
    assert re.search(
        r"http://google\.com\n  HTTP/1.1 200 OK\n(?:  .*\n)*?.*You cannot go there right now",
        redirect,
    ), redirect
    assert has_sample(
        redirect,
        http,
        route_name="unencrypted-http",
        hostname="google.com",
        http_status="200",
    ), redirect
    assert has_sample(
        redirect,
        "outbound_tls_route_open_total",
        route_name="tls-egress",
        hostname="github.com",
    ), redirect

    assert leftovers(process.pid) == []


def test_demo_interrupted_mid_guide_removes_everything() -> None:
    preflight()
    process = subprocess.Popen(
        demo_command(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=demo_environment(),
        cwd=REPO,
    )
    assert process.stdout is not None
    seen = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + INTERRUPT_TIMEOUT
            while b"Step 2/5" not in seen and time.monotonic() < deadline:
                if selector.select(timeout=0.5):
                    chunk = os.read(process.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    seen += chunk
        assert b"Step 2/5" in seen, seen.decode(errors="replace")
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=INTERRUPT_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = (seen + rest).decode(errors="replace")
    assert process.returncode == 130, output
    assert "everything it made has been removed" in output
    assert leftovers(process.pid) == []
