"""Side by side: a direct connection, HAProxy (TCP and HTTP mode) and egressproxy.

Every workload runs against every proxy that can carry it, interleaved, for
several rounds; the report gives medians, ratios to direct and to HAProxy, and
each proxy's own CPU per unit of work (utime+stime of its whole process tree
from /proc, before and after the run). Proxies run on one core, load
generators and servers on the other. Run through benchmarks/run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from benchworld import (
    ADMIN_PORT,
    HOSTNAME,
    IDLE_IP,
    IPERF_PORT,
    LARGE_FILE,
    LOAD_CPU,
    PROXY_CPU,
    PROXY_PORT,
    PROXY_USER,
    SMALL_FILE,
    WEB_IP,
    Started,
    World,
    descendants,
    http_get,
    last_line,
    run,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TIMES = "\N{MULTIPLICATION SIGN}"
WRK_CONNECTIONS = 32

HAPROXY_GLOBAL = f"""\
global
  # a spliced connection also holds a pipe (two descriptors) out of the 20,000 allowed
  maxconn 7000
  nbthread 1
  user {PROXY_USER}
  group {PROXY_USER}
defaults
  timeout connect 5s
  timeout client 1h
  timeout server 1h
"""


def haproxy_tcp(*, splice: bool) -> str:
    """TCP mode with an SNI ACL; server 0.0.0.0:0 goes to the original destination
    (SO_ORIGINAL_DST), since HAProxy is built with +NETFILTER +TPROXY on Linux."""
    splice_option = "\n  option splice-auto" if splice else ""
    return (
        HAPROXY_GLOBAL
        + f"""\
frontend transparent
  mode tcp{splice_option}
  bind 0.0.0.0:{PROXY_PORT}
  tcp-request inspect-delay 1s
  tcp-request content reject if {{ req.ssl_hello_type 1 }} !{{ req.ssl_sni -i {HOSTNAME} }}
  tcp-request content accept
  default_backend original_destination
backend original_destination
  mode tcp
  server original 0.0.0.0:0
"""
    )


HAPROXY_HTTP = (
    HAPROXY_GLOBAL
    + f"""\
frontend transparent
  mode http
  bind 0.0.0.0:{PROXY_PORT}
  acl bench_file path /{SMALL_FILE} /{LARGE_FILE}
  acl bench_file path_beg /{SMALL_FILE}/
  http-request deny deny_status 403 unless {{ hdr(host) -i {HOSTNAME} }}
  http-request deny deny_status 403 unless bench_file
  default_backend original_destination
backend original_destination
  mode http
  server original 0.0.0.0:0
"""
)

POLICY = f"""\
# Everything is denied unless a route allows it, so every connection and every
# HTTP request is decided.
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata:
  namespace: linkerd-egress
  name: bench
spec:
  trafficPolicy: Deny
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  namespace: linkerd-egress
  name: bench-files
spec:
  parentRefs:
    - {{name: bench, kind: EgressNetwork, group: policy.linkerd.io, port: 80}}
  hostnames: [{HOSTNAME}]
  rules:
    - matches:
        - path: {{type: Exact, value: /{SMALL_FILE}}}
        - path: {{type: Exact, value: /{LARGE_FILE}}}
        - path: {{type: PathPrefix, value: /{SMALL_FILE}/}}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata:
  namespace: linkerd-egress
  name: bench-tls
spec:
  hostnames: [{HOSTNAME}]
  parentRefs:
    - {{name: bench, kind: EgressNetwork, group: policy.linkerd.io, port: 443}}
  rules:
    - backendRefs:
        - {{name: bench, kind: EgressNetwork, group: policy.linkerd.io}}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  namespace: linkerd-egress
  name: bench-iperf
spec:
  parentRefs:
    - {{name: bench, kind: EgressNetwork, group: policy.linkerd.io, port: {IPERF_PORT}}}
  rules:
    - backendRefs:
        - {{name: bench, kind: EgressNetwork, group: policy.linkerd.io}}
"""


# -- proxies ------------------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    name: str
    start: Callable[[World], Started | None]
    only: frozenset[str] | None = None
    """The workloads it runs, when not all of them."""


def start_haproxy(config: str, name: str) -> Callable[[World], Started]:
    def start(world: World) -> Started:
        path = world.tmp / f"{name}.cfg"
        path.write_text(config)
        started = world.start(name, world.client_ns, PROXY_CPU, ["haproxy", "-f", str(path), "-db"])
        world.wait_listening(world.client_ns, PROXY_PORT, started)
        return started

    return start


def as_proxy_user(world: World, arguments: list[str], wrapper: Sequence[str] = ()) -> list[str]:
    """The command that runs Python with arguments under the proxy's uid (which the
    redirect returns), on the benchmark's ports; wrapper (a counter) runs Python."""
    return [
        "setpriv",
        f"--reuid={PROXY_USER}",
        f"--regid={PROXY_USER}",
        "--init-groups",
        "env",
        f"PYTHONPATH={world.tmp / 'pythonpath'}",
        *wrapper,
        sys.executable,
        *arguments,
        "--listen",
        f"0.0.0.0:{PROXY_PORT}",
        "--admin",
        f"127.0.0.1:{ADMIN_PORT}",
    ]


def start_as_proxy_user(world: World, name: str, arguments: list[str]) -> Started:
    """A Python proxy under the proxy's uid, once /ready says 200."""
    command = as_proxy_user(world, arguments)
    started = world.start(name, world.client_ns, PROXY_CPU, command)
    world.wait_listening(world.client_ns, PROXY_PORT, started)
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if http_get(world.client_ns, ADMIN_PORT, "/ready")[0] == 200:
                return started
        if started.process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{name} never got ready: {last_line(started.log)}")


def policy_file(world: World) -> Path:
    """The benchmark's policy, written once per world, readable by the proxy's uid."""
    policy = world.tmp / "policy.yaml"
    if not policy.exists():
        policy.write_text(POLICY)
        policy.chmod(0o644)
    return policy


def start_egressproxy(workers: int, *, access_log: bool = False) -> Callable[[World], Started]:
    """--workers N; the access log (the default --log-level info) only when asked for.

    Without it the proxies compare like for like (no HAProxy here logs); with it,
    one line per request or connection goes to the proxy's stderr, as shipped; the
    harness keeps that stream in a file of the run's temporary directory.
    """
    name = f"egressproxy-w{workers}{'-log' if access_log else ''}"
    levels = [] if access_log else ["--log-level", "warning"]

    def start(world: World) -> Started:
        arguments = ["-m", "egressproxy", "run", "--policy", str(policy_file(world))]
        options = ["--workers", str(workers), "--drain-timeout", "1", *levels]
        return start_as_proxy_user(world, name, [*arguments, *options])

    return start


def start_floor(kind: str) -> Callable[[World], Started]:
    """benchmarks/floors.py: the same connection handling with no work of egressproxy's."""

    def start(world: World) -> Started:
        script = world.tmp / "pythonpath" / "floors.py"
        return start_as_proxy_user(world, f"floor-{kind}", [str(script), kind])

    return start


def start_sketch(world: World) -> Started:
    """benchmarks/sketch.py: egressproxy's work for one exchange, on plain sockets."""
    script = world.tmp / "pythonpath" / "sketch.py"
    arguments = [str(script), "--policy", str(policy_file(world))]
    return start_as_proxy_user(world, "sketch-nested", arguments)


BULK = frozenset({"bulk-1", "bulk-4", "bulk-tls"})
RELAYED_EXCHANGES = frozenset({"new-conn", "keepalive"})
"""What the floors are measured on: a relay's cost does not depend on the heads it carries."""
HTTP_EXCHANGES = RELAYED_EXCHANGES | {"keepalive-varied"}

PROXIES = [
    Proxy("direct", lambda world: None),
    Proxy("haproxy-tcp", start_haproxy(haproxy_tcp(splice=False), "haproxy-tcp")),
    Proxy(
        "haproxy-tcp-splice",
        start_haproxy(haproxy_tcp(splice=True), "haproxy-tcp-splice"),
        only=BULK,
    ),
    Proxy(
        "haproxy-http",
        start_haproxy(HAPROXY_HTTP, "haproxy-http"),
        only=HTTP_EXCHANGES,
    ),
    Proxy("egressproxy-w1", start_egressproxy(1)),
    Proxy(
        "egressproxy-w1-log",
        start_egressproxy(1, access_log=True),
        only=HTTP_EXCHANGES,
    ),
    Proxy("egressproxy-w2", start_egressproxy(2)),
    Proxy("floor-uvloop", start_floor("uvloop"), only=BULK | RELAYED_EXCHANGES),
    Proxy("floor-epoll", start_floor("epoll"), only=RELAYED_EXCHANGES),
    Proxy("floor-nested", start_floor("nested"), only=RELAYED_EXCHANGES),
    Proxy("sketch-nested", start_sketch, only=frozenset({"new-conn"})),
    Proxy("floor-splice", start_floor("splice"), only=BULK),
]


# -- measuring a process tree -------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of pid and its living descendants, plus their reaped children's."""
    ticks = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) summed over the tree."""
    rss = fds = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{member}/fd"))
    return rss, fds


# -- workloads ----------------------------------------------------------------


@dataclass
class Run:
    world: World
    proxy: Proxy
    started: Started | None
    duration: int
    idle_connections: int

    def cpu(self) -> float:
        return tree_cpu_seconds(self.started.process.pid) if self.started else 0.0

    def client(self, command: list[str], timeout: float) -> str:
        return run(
            ["ip", "netns", "exec", self.world.client_ns, "taskset", "-c", LOAD_CPU, *command],
            timeout=timeout,
        )


Measurement = dict[str, Any]

SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_wrk(output: str) -> Measurement:
    summary = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", output)
    if summary is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    result: Measurement = {
        "requests": int(summary[1]),
        "seconds": float(summary[2]) * TIME_UNITS[summary[3]],
        "bytes": float(summary[4]) * SIZE_UNITS[summary[5]],
        "errors": 0,
        "non_2xx": 0,
    }
    for percentile in ("50", "99"):
        found = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if found:
            result[f"p{percentile}_ms"] = float(found[1]) * TIME_UNITS[found[2]] * 1000
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors:
        result["errors"] = sum(int(count) for count in errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        result["non_2xx"] = int(non_2xx[1])
    return result


VARIED_REQUESTS = """\
-- every request of the run its own path, /100b/1, /100b/2 ... (nginx serves /100b for
-- each): a proxy decides each anew, none from an earlier request's decision
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, wrk.path .. "/" .. counter)
end
"""


def wrk(
    context: Run, url: str, *, connections: int, close: bool, varied: bool = False
) -> Measurement:
    """varied: no two requests of the run have the same path (VARIED_REQUESTS)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{context.duration}s", "--latency"]
    if close:
        command += ["-H", "Connection: close"]
    if varied:
        script = context.world.tmp / "varied.lua"
        script.write_text(VARIED_REQUESTS)
        command += ["-s", str(script)]
    before = context.cpu()
    output = context.client([*command, url], timeout=context.duration + 60)
    cpu = context.cpu() - before
    result = parse_wrk(output)
    result["cpu_seconds"] = cpu
    return result


def decided_requests(context: Run) -> int | None:
    """Requests egressproxy counted on its HTTP route metric, one by one, if any."""
    if context.started is None or not context.proxy.name.startswith("egressproxy"):
        return None
    try:
        status, body = http_get(context.world.client_ns, ADMIN_PORT, "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    total = 0.0
    for line in body.splitlines():
        if line.startswith("outbound_http_route_request_statuses_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


IPERF_CONNECT_RETRIES = 1
"""A run whose iperf3 could not connect its streams is made again this many times: the
iperf3 server refused a stream of a run that went straight to it (no proxy) once in
many suites, between two runs; the failure says nothing of the proxy measured."""


def bulk_tcp(streams: int) -> Callable[[Run], Measurement]:
    def measure(context: Run) -> Measurement:
        command = [
            "iperf3",
            "-c",
            WEB_IP,
            "-p",
            str(IPERF_PORT),
            "-t",
            str(context.duration),
            "-P",
            str(streams),
            "-J",
            "--connect-timeout",
            "5000",
        ]
        for attempt in range(IPERF_CONNECT_RETRIES + 1):
            before = context.cpu()
            output = context.client(command, timeout=context.duration + 60)
            cpu = context.cpu() - before
            report = json.loads(output)
            error = report.get("error", "")
            if not error.startswith("unable to connect") or attempt == IPERF_CONNECT_RETRIES:
                break
            print(f"    iperf3: {error}; made again", file=sys.stderr, flush=True)
            time.sleep(1)
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        received = report["end"]["sum_received"]
        return {
            "value": received["bits_per_second"] / 1e9,
            "cpu_per_unit": cpu * 100 / (received["bytes"] * 8 / 1e9),
            "cpu_seconds": cpu,
            "bytes": received["bytes"],
        }

    return measure


def bulk_tls(context: Run) -> Measurement:
    result = wrk(context, f"https://{HOSTNAME}/{LARGE_FILE}", connections=1, close=False)
    result["value"] = result["bytes"] * 8 / 1e9 / result["seconds"]
    result["cpu_per_unit"] = result["cpu_seconds"] * 100 / (result["bytes"] * 8 / 1e9)
    return result


def per_request(
    url: str, *, close: bool, decide_per_request: bool = True, varied: bool = False
) -> Callable[[Run], Measurement]:
    def measure(context: Run) -> Measurement:
        result = wrk(context, url, connections=WRK_CONNECTIONS, close=close, varied=varied)
        result["value"] = result["requests"] / result["seconds"]
        result["cpu_per_unit"] = result["cpu_seconds"] * 1e6 / max(result["requests"], 1)
        if decide_per_request:
            result["decided_requests"] = decided_requests(context)
        return result

    return measure


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("idle client did not answer")
    return process.stdout.readline().strip()


def idle(context: Run) -> Measurement:
    assert context.started is not None
    command = [
        "ip",
        "netns",
        "exec",
        context.world.client_ns,
        "taskset",
        "-c",
        LOAD_CPU,
        sys.executable,
        str(Path(__file__).with_name("idle.py")),
        "open",
        IDLE_IP,
        "443",
        HOSTNAME,
        str(context.idle_connections),
    ]
    pid = context.started.process.pid
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as client:
        assert client.stdin is not None
        try:
            if read_line(client, 60) != "warm":
                raise RuntimeError("idle client failed to warm up")
            rss_before, fds_before = tree_memory(pid)
            client.stdin.write("go\n")
            client.stdin.flush()
            answer = read_line(client, 180)
            opened = int(answer.split()[1])
            rss_after, fds_after = tree_memory(pid)
            client.stdin.write("done\n")
            client.stdin.flush()
            client.wait(60)
        finally:
            if client.poll() is None:
                client.kill()
    return {
        "value": (rss_after - rss_before) / max(opened, 1),
        "fds_per_connection": (fds_after - fds_before) / max(opened, 1),
        "connections": opened,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
    }


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    unit: str
    cpu_unit: str
    measure: Callable[[Run], Measurement]
    reference: str = "haproxy-tcp"
    higher_is_better: bool = True
    needs_proxy: bool = False


WORKLOADS = [
    Workload("bulk-1", "bulk TCP, iperf3 1 stream", "Gbit/s", "% core per Gbit/s", bulk_tcp(1)),
    Workload("bulk-4", "bulk TCP, iperf3 4 streams", "Gbit/s", "% core per Gbit/s", bulk_tcp(4)),
    Workload("bulk-tls", "bulk TLS, 100 MiB over HTTPS", "Gbit/s", "% core per Gbit/s", bulk_tls),
    Workload(
        "new-conn",
        "new connections, HTTP Connection: close",
        "conn/s",
        "µs per conn",
        per_request(f"http://{HOSTNAME}/{SMALL_FILE}", close=True),
    ),
    Workload(
        "keepalive",
        "HTTP/1.1 keep-alive, 100 B",
        "req/s",
        "µs per req",
        per_request(f"http://{HOSTNAME}/{SMALL_FILE}", close=False),
        reference="haproxy-http",
    ),
    Workload(
        "keepalive-varied",
        "HTTP/1.1 keep-alive, 100 B, no head twice",
        "req/s",
        "µs per req",
        per_request(f"http://{HOSTNAME}/{SMALL_FILE}", close=False, varied=True),
        reference="haproxy-http",
    ),
    Workload(
        "new-tls",
        "new TLS connections (full handshake)",
        "conn/s",
        "µs per conn",
        per_request(f"https://{HOSTNAME}/{SMALL_FILE}", close=True, decide_per_request=False),
    ),
    Workload(
        "idle",
        "idle spliced connections: RSS",
        "KiB per conn",
        "fds per conn",
        idle,
        higher_is_better=False,
        needs_proxy=True,
    ),
]


# -- running ------------------------------------------------------------------


@dataclass
class Results:
    rounds: list[dict[str, dict[str, Measurement]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def samples(self, workload: str, proxy: str) -> list[Measurement]:
        return [r[workload][proxy] for r in self.rounds if proxy in r.get(workload, {})]

    def median(self, workload: str, proxy: str, key: str) -> float | None:
        values = [
            sample[key] for sample in self.samples(workload, proxy) if sample.get(key) is not None
        ]
        return statistics.median(values) if values else None

    def round_ratios(self, workload: str, proxy: str, reference: str) -> list[float]:
        """value / the reference's value within each round that measured both.

        Rounds interleave the proxies, so a slow spell of the machine weighs on both
        sides of a round's ratio: their spread shows how far one run's median can be
        trusted."""
        ratios = []
        for measured in self.rounds:
            by_proxy = measured.get(workload, {})
            value = by_proxy.get(proxy, {}).get("value")
            base = by_proxy.get(reference, {}).get("value")
            if value is not None and base:
                ratios.append(value / base)
        return ratios


def applicable(workload: Workload, proxy: Proxy) -> bool:
    if proxy.only is not None and workload.name not in proxy.only:
        return False
    return not (workload.needs_proxy and proxy.name == "direct")


def run_all(world: World, rounds: int, duration: int, idle_connections: int) -> Results:
    results = Results()
    for number in range(rounds):
        this_round: dict[str, dict[str, Measurement]] = {}
        results.rounds.append(this_round)
        order = PROXIES[number % len(PROXIES) :] + PROXIES[: number % len(PROXIES)]
        for workload in WORKLOADS:
            for proxy in order:
                if not applicable(workload, proxy):
                    continue
                label = f"round {number + 1}/{rounds} {workload.name} {proxy.name}"
                print(f"  {label}", file=sys.stderr, flush=True)
                world.set_redirect(proxy.name != "direct")
                started = None
                try:
                    started = proxy.start(world)
                    measurement = workload.measure(
                        Run(world, proxy, started, duration, idle_connections)
                    )
                    this_round.setdefault(workload.name, {})[proxy.name] = measurement
                    for problem in invalid(measurement, idle_connections):
                        results.failures.append(f"{label}: {problem}")
                        print(f"  INVALID {label}: {problem}", file=sys.stderr, flush=True)
                except (
                    RuntimeError,
                    TimeoutError,
                    subprocess.SubprocessError,
                    KeyError,
                    ValueError,
                    OSError,
                ) as error:
                    results.failures.append(f"{label}: {error}")
                    print(f"  FAILED {label}: {error}", file=sys.stderr, flush=True)
                finally:
                    if started is not None:
                        world.stop(started)
    return results


def invalid(measurement: Measurement, idle_connections: int) -> list[str]:
    """Why a measurement says nothing of the proxy: answers other than the file (a
    refused request costs a proxy less than a forwarded one), nothing moved, or idle
    connections the proxy did not all answer. Such a run fails the benchmark."""
    problems = []
    if measurement.get("non_2xx"):
        problems.append(f"{measurement['non_2xx']} answers were not 2xx")
    connections = measurement.get("connections")
    if connections is None and not measurement.get("value"):  # idle: a page holds many
        problems.append("nothing was measured (a result of 0)")
    if connections is not None and connections < idle_connections:
        problems.append(f"{connections} of {idle_connections} idle connections answered")
    return problems


# -- reporting ----------------------------------------------------------------


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference == 0:
        return "—"
    return f"{value / reference:.2f}{TIMES}"


def number(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def by_round(ratios: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in ratios) or "—"


def notes(results: Results, workload: Workload, proxy: str) -> str:
    parts = []
    p50 = results.median(workload.name, proxy, "p50_ms")
    p99 = results.median(workload.name, proxy, "p99_ms")
    if workload.name.startswith("keepalive") and p50 is not None and p99 is not None:
        parts.append(f"p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    if workload.name == "idle":
        connections = results.median(workload.name, proxy, "connections")
        if connections is not None:
            parts.append(f"{connections:.0f} conns")
    decided = results.median(workload.name, proxy, "decided_requests")
    if decided is not None:
        requests = results.median(workload.name, proxy, "requests") or 0
        parts.append(f"{decided / requests:.0%} of requests counted on a route" if requests else "")
    errors = results.median(workload.name, proxy, "errors")
    non_2xx = results.median(workload.name, proxy, "non_2xx")
    if errors:
        parts.append(f"{errors:.0f} socket errors")
    if non_2xx:
        parts.append(f"**{non_2xx:.0f} non-2xx**")
    return "; ".join(part for part in parts if part)


def table(results: Results) -> str:
    lines = [
        f"| workload | proxy | result | {TIMES} direct | {TIMES} HAProxy "
        f"| {TIMES} HAProxy by round | proxy CPU | CPU {TIMES} HAProxy | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for workload in WORKLOADS:
        direct = results.median(workload.name, "direct", "value")
        reference = results.median(workload.name, workload.reference, "value")
        reference_cpu_key = "fds_per_connection" if workload.name == "idle" else "cpu_per_unit"
        reference_cpu = results.median(workload.name, workload.reference, reference_cpu_key)
        for proxy in PROXIES:
            if not applicable(workload, proxy):
                continue
            value = results.median(workload.name, proxy.name, "value")
            cpu = results.median(workload.name, proxy.name, reference_cpu_key)
            is_direct = proxy.name == "direct"
            rounds = (
                "—"
                if proxy.name == workload.reference
                else by_round(results.round_ratios(workload.name, proxy.name, workload.reference))
            )
            lines.append(
                f"| {workload.title} | {proxy.name} | {number(value)} {workload.unit} "
                f"| {ratio(value, direct)} | {ratio(value, reference)} | {rounds} "
                f"| {'—' if is_direct else f'{number(cpu)} {workload.cpu_unit}'} "
                f"| {'—' if is_direct else ratio(cpu, reference_cpu)} "
                f"| {notes(results, workload, proxy.name)} |"
            )
    return "\n".join(lines)


def load_average() -> str:
    """The 1-minute load average: how busy the machine was besides the benchmark."""
    return Path("/proc/loadavg").read_text().split(" ", 1)[0]


def machine(load_at_start: str) -> dict[str, str]:
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]

    def version(command: list[str], pattern: str) -> str:
        output = run(command, check=False)
        found = re.search(pattern, output)
        return found[0] if found else "?"

    return {
        "load average at the start": load_at_start,
        "load average at the end": load_average(),
        "cpu": cpu_model,
        "cores": str(os.cpu_count()),
        "memory": f"{int(memory) // 1024 // 1024} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": version(["haproxy", "-v"], r"\d+\.\d+\.\d+\S*"),
        "nginx": version(["sh", "-c", "nginx -v 2>&1"], r"\d+\.\d+\.\d+"),
        "wrk": version(["sh", "-c", "wrk --version 2>&1 || true"], r"\d+\.\d+\.\d+"),
        "iperf3": version(["iperf3", "--version"], r"\d+\.\d+\S*"),
    }


def write_reports(
    results: Results, smoke: bool, settings: dict[str, int], host: dict[str, str]
) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{stamp}{'-smoke' if smoke else ''}.json"
    medians = {
        workload.name: {
            proxy.name: {
                key: results.median(workload.name, proxy.name, key)
                for key in sorted(
                    {k for s in results.samples(workload.name, proxy.name) for k in s}
                )
            }
            for proxy in PROXIES
            if applicable(workload, proxy)
        }
        for workload in WORKLOADS
    }
    path.write_text(
        json.dumps(
            {
                "started": stamp,
                "smoke": smoke,
                "settings": settings,
                "machine": host,
                "rounds": results.rounds,
                "medians": medians,
                "failures": results.failures,
            },
            indent=2,
        )
    )
    if not smoke:
        machine_line = ", ".join(f"{key} {value}" for key, value in host.items())
        (RESULTS / "latest.md").write_text(
            f"# Latest benchmark ({stamp})\n\n"
            f"Machine: {machine_line}.\n\n"
            f"Rounds {settings['rounds']}, {settings['duration']} s per run, "
            f"{settings['idle_connections']} idle connections; medians.\n\n"
            f"{table(results)}\n"
        )
    return path


# -- entry point --------------------------------------------------------------


def interrupt(signum: int, _: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def world_for(repo: Path) -> Iterator[World]:
    world = World()
    try:
        world.build(repo)
        yield world
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        world.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one short round of each workload")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per timed run")
    parser.add_argument("--idle-connections", type=int, default=5000)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.duration, args.idle_connections = 1, 1, 100
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    settings = {
        "rounds": args.rounds,
        "duration": args.duration,
        "idle_connections": args.idle_connections,
    }
    began, load_at_start = time.monotonic(), load_average()
    try:
        with world_for(REPO) as world:
            results = run_all(world, args.rounds, args.duration, args.idle_connections)
    except KeyboardInterrupt as stop:
        print(f"benchmarks: interrupted ({stop}); everything started was stopped", file=sys.stderr)
        return 130
    path = write_reports(results, args.smoke, settings, machine(load_at_start))
    print(table(results))
    print(f"\n{time.monotonic() - began:.0f} s; JSON: {path}", file=sys.stderr)
    for failure in results.failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
