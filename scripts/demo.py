"""Replays the Linkerd egress guide against egressproxy in a throw-away sandbox.

    client ns (epdemo-cli-PID)                  internet ns (epdemo-net-PID)
    198.18.0.2 ─────────── veth ─────────────── 198.18.0.1
    egressproxy iptables install                 on lo, fake hosts served by this program:
      --proxy-uid 2102 (nat OUTPUT → :15001)       203.0.113.10 httpbin.org   :80 :443
    egressproxy run (uid 2102), admin :4191        203.0.113.20 github.com    :80 :443
    curl; names from /etc/netns/NS/hosts           203.0.113.30 google.com    :80 :443
                                                   203.0.113.50 internal-egress (the
                                                     guide's in-cluster Service) :80

Each guide step swaps the policy file for the matching config/examples/linkerd-*.yaml
(the proxy hot-reloads it, as `kubectl apply` would update Linkerd), runs the
guide's curl commands in the client namespace and prints the route metrics they
moved. Every outcome is checked against the guide; the exit status says whether
all matched. Everything is removed at the end, also on Ctrl-C or an error; the
host's own network namespace is never touched. Needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import http.client
import http.server
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "config" / "examples"
PACKAGE = REPO / "egressproxy"

PROXY_UID = 2102
ADMIN = ("127.0.0.1", 4191)
CLIENT_ADDRESS, INTERNET_ADDRESS = "198.18.0.2", "198.18.0.1"
NAMESPACE_PATTERN = re.compile(r"^epdemo-(?:cli|net)-(\d+)$")
WORKDIR_PREFIX = "egressproxy-demo-"
NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")
CLONE_NEWNET = 0x40000000

COMMAND_TIMEOUT = 10.0
CURL_TIMEOUT = 5
READY_TIMEOUT = 15.0
RELOAD_TIMEOUT = 5.0
"""The proxy looks at the policy file every second."""
METRICS_TIMEOUT = 3.0
"""A spliced connection is counted closed a moment after curl has hung up."""
STOP_TIMEOUT = 5.0
BODY_LINES = 6
PROXY_PID_FILE = "proxy.pid"


@dataclass(frozen=True)
class FakeHost:
    name: str
    address: str


HTTPBIN = FakeHost("httpbin.org", "203.0.113.10")
GITHUB = FakeHost("github.com", "203.0.113.20")
GOOGLE = FakeHost("google.com", "203.0.113.30")
INTERNAL = FakeHost("internal-egress.egress-test.svc.cluster.local", "203.0.113.50")
"""The guide's in-cluster Service that step 5 redirects plaintext HTTP to."""
FAKE_HOSTS = (HTTPBIN, GITHUB, GOOGLE, INTERNAL)

HTTP_FAMILY = "outbound_http_route_request_statuses_total"
TLS_OPEN = "outbound_tls_route_open_total"
TLS_CLOSE = "outbound_tls_route_close_total"
TCP_OPEN = "outbound_tcp_route_open_total"
TCP_CLOSE = "outbound_tcp_route_close_total"
SHOWN_FAMILIES = (HTTP_FAMILY, TLS_OPEN, TLS_CLOSE, TCP_OPEN, TCP_CLOSE)


class DemoError(RuntimeError):
    """The sandbox cannot be built or the proxy misbehaves: said in one line, no traceback."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: leave like Ctrl-C does, through the cleanup."""


# ---------------------------------------------------------------- the guide


@dataclass(frozen=True)
class Curl:
    url: str
    status: int | None
    """The expected HTTP status; None: the connection is expected to fail."""
    body: str = ""
    """Text the expected answer contains."""


@dataclass(frozen=True)
class Sample:
    family: str
    labels: dict[str, str]
    """The labels that identify the guide's sample; the others are shown, not checked."""


@dataclass(frozen=True)
class Step:
    title: str
    policy: str
    says: str
    curls: tuple[Curl, ...]
    samples: tuple[Sample, ...]


def http_sample(route: str, hostname: str, status: str) -> Sample:
    return Sample(
        HTTP_FAMILY,
        {"route_name": route, "hostname": hostname, "http_status": status, "error": ""},
    )


STEPS = (
    Step(
        "Visualizing egress traffic",
        "linkerd-1-allow.yaml",
        "EgressNetwork all-egress-traffic, trafficPolicy: Allow: everything passes and is counted.",
        (Curl(f"http://{HTTPBIN.name}/get", 200, '"url": "http://httpbin.org/get"'),),
        (http_sample("http-egress-allow", HTTPBIN.name, "200"),),
    ),
    Step(
        "Restricting egress traffic",
        "linkerd-2-deny.yaml",
        "trafficPolicy patched to Deny: plaintext HTTP is answered 403 by the proxy.",
        (Curl(f"http://{HTTPBIN.name}/get", 403, "traffic not allowed"),),
        (http_sample("http-egress-deny", HTTPBIN.name, "403"),),
    ),
    Step(
        "Allowing httpbin.org/get with an HTTPRoute",
        "linkerd-3-httproute.yaml",
        "HTTPRoute httpbin-get on port 80 matches /get; other paths and HTTPS stay denied.",
        (
            Curl(f"http://{HTTPBIN.name}/get", 200, '"url": "http://httpbin.org/get"'),
            Curl(f"http://{HTTPBIN.name}/ip", 403, "traffic not allowed"),
            Curl(f"https://{HTTPBIN.name}/get", None),
        ),
        (
            http_sample("httpbin-get", HTTPBIN.name, "200"),
            http_sample("http-egress-deny", HTTPBIN.name, "403"),
            Sample(TCP_CLOSE, {"route_name": "tcp-egress-deny", "error": "forbidden"}),
        ),
    ),
    Step(
        "Allowing HTTPS to httpbin.org with a TLSRoute",
        "linkerd-4-tlsroute.yaml",
        "TLSRoute tls-egress on port 443 for hostname httpbin.org: other SNIs are closed.",
        (
            Curl(f"https://{HTTPBIN.name}/get", 200, '"url": "https://httpbin.org/get"'),
            Curl(f"https://{GITHUB.name}", None),
        ),
        (
            Sample(TLS_OPEN, {"route_name": "tls-egress", "hostname": HTTPBIN.name}),
            Sample(
                TLS_CLOSE,
                {"route_name": "tls-egress-deny", "hostname": GITHUB.name, "error": "forbidden"},
            ),
        ),
    ),
    Step(
        "Redirecting egress traffic back to the cluster",
        "linkerd-5-redirect.yaml",
        "HTTP only to /get, TLS to every host, other plaintext HTTP to the internal-egress"
        " Service.",
        (
            Curl(f"http://{HTTPBIN.name}/get", 200, '"url": "http://httpbin.org/get"'),
            Curl(f"https://{HTTPBIN.name}/ip", 200, '"origin"'),
            Curl(f"https://{GITHUB.name}", 200, "GitHub"),
            Curl(f"http://{GOOGLE.name}", 200, "You cannot go there right now"),
        ),
        (
            http_sample("httpbin-get", HTTPBIN.name, "200"),
            Sample(TLS_OPEN, {"route_name": "tls-egress", "hostname": HTTPBIN.name}),
            Sample(TLS_OPEN, {"route_name": "tls-egress", "hostname": GITHUB.name}),
            http_sample("unencrypted-http", GOOGLE.name, "200"),
        ),
    ),
)


# ---------------------------------------------------------------- commands and namespaces


def run(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    """Run a setup command (bounded); its failure is a DemoError naming the command."""
    try:
        done = subprocess.run(
            argv, capture_output=True, timeout=COMMAND_TIMEOUT, check=True, env=env
        )
    except FileNotFoundError:
        raise DemoError(f"`{argv[0]}` is not installed (run ./scripts/setup)") from None
    except subprocess.CalledProcessError as error:
        stderr = error.stderr.decode(errors="replace").strip()
        raise DemoError(f"`{' '.join(argv)}` failed: {stderr}") from None
    except subprocess.TimeoutExpired:
        raise DemoError(f"`{' '.join(argv)}` did not finish in {COMMAND_TIMEOUT}s") from None
    return done.stdout.decode(errors="replace")


_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def call_in(ns: str, function: Callable[[], T]) -> T:
    """Run `function` on a thread that joined namespace `ns` (Python 3.11 has no os.setns).

    Sockets made there stay in that namespace for life and serve from any thread.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            with (NETNS_RUN / ns).open("rb") as handle:
                if _libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {ns}: {os.strerror(errno)}")
            outcome.append(function())
        except BaseException as error:  # re-raised on the caller's thread below
            failure.append(error)

    thread = threading.Thread(target=target, name=f"in {ns}", daemon=True)
    thread.start()
    thread.join(COMMAND_TIMEOUT)
    if thread.is_alive():
        raise DemoError(f"a thread inside namespace {ns} hung")
    if failure:
        raise failure[0]
    return outcome[0]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Namespaces, hosts files and workdirs of earlier demo runs that were killed (-9)."""
    names = run(["ip", "netns", "list"]).split()
    for name in names:
        match = NAMESPACE_PATTERN.match(name)
        if match and not pid_alive(int(match.group(1))):
            run(["ip", "netns", "del", name])
    if NETNS_ETC.is_dir():
        for directory in NETNS_ETC.iterdir():
            match = NAMESPACE_PATTERN.match(directory.name)
            if match and not pid_alive(int(match.group(1))):
                shutil.rmtree(directory, ignore_errors=True)
    for directory in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        pid_text = directory.name.removeprefix(WORKDIR_PREFIX).split("-")[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            kill_orphaned_proxy(directory)
            shutil.rmtree(directory, ignore_errors=True)


def kill_orphaned_proxy(workdir: Path) -> None:
    """The proxy of a killed run outlives it (own session); its PID file names it."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((workdir / PROXY_PID_FILE).read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        if str(workdir).encode() in command:
            os.kill(pid, signal.SIGKILL)


@dataclass
class Sandbox:
    client_ns: str
    internet_ns: str
    workdir: Path
    cleanup: contextlib.ExitStack

    @property
    def package_root(self) -> Path:
        return self.workdir / "package"

    @property
    def policy(self) -> Path:
        return self.workdir / "policy.yaml"

    @property
    def ca_cert(self) -> Path:
        return self.workdir / "ca.pem"


def build_namespaces(box: Sandbox) -> None:
    pid = os.getpid()
    client_if, internet_if = f"epd{pid}c", f"epd{pid}n"
    for ns in (box.internet_ns, box.client_ns):
        run(["ip", "netns", "add", ns])
        box.cleanup.callback(run, ["ip", "netns", "del", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "link", "add", client_if, "netns", box.client_ns,
         "type", "veth", "peer", "name", internet_if, "netns", box.internet_ns])  # fmt: skip
    run(["ip", "-n", box.client_ns, "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", client_if])
    run(["ip", "-n", box.client_ns, "link", "set", client_if, "up"])
    run(["ip", "-n", box.client_ns, "route", "add", "default", "via", INTERNET_ADDRESS])
    run(["ip", "-n", box.internet_ns, "addr", "add", f"{INTERNET_ADDRESS}/24", "dev", internet_if])
    run(["ip", "-n", box.internet_ns, "link", "set", internet_if, "up"])
    for host in FAKE_HOSTS:
        run(["ip", "-n", box.internet_ns, "addr", "add", f"{host.address}/32", "dev", "lo"])

    etc = NETNS_ETC / box.client_ns
    etc.mkdir(parents=True)
    box.cleanup.callback(shutil.rmtree, etc, True)
    lines = ["127.0.0.1 localhost", "::1 localhost"]
    lines += [f"{host.address} {host.name}" for host in FAKE_HOSTS]
    (etc / "hosts").write_text("\n".join(lines) + "\n")
    (etc / "hosts").chmod(0o644)


def make_workdir(cleanup: contextlib.ExitStack) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
    cleanup.callback(shutil.rmtree, workdir, True)
    workdir.chmod(0o755)
    return workdir


def copy_package(box: Sandbox) -> None:
    """The checkout may sit under /root (0700), which uid 2102 cannot enter."""
    shutil.copytree(
        PACKAGE,
        box.package_root / "egressproxy",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    for directory, _, files in os.walk(box.package_root):
        Path(directory).chmod(0o755)
        for name in files:
            Path(directory, name).chmod(0o644)


def egressproxy_env(box: Sandbox) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": str(box.package_root),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def install_redirect(box: Sandbox) -> list[str]:
    argv = ["egressproxy", "iptables", "install", "--proxy-uid", str(PROXY_UID)]
    run(["ip", "netns", "exec", box.client_ns, sys.executable, "-m", *argv],
        env=egressproxy_env(box))  # fmt: skip
    return argv


# ---------------------------------------------------------------- the fake internet


def make_certificates(box: Sandbox) -> tuple[Path, Path]:
    """A test CA (trusted by curl via --cacert) and one certificate for every fake name."""
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    later = now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egressproxy demo CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(host.name) for host in FAKE_HOSTS]
    names += [x509.IPAddress(ipaddress.ip_address(host.address)) for host in FAKE_HOSTS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake internet")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    box.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    box.ca_cert.chmod(0o644)
    cert_path, key_path = box.workdir / "server.pem", box.workdir / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


HOST_BY_ADDRESS = {host.address: host for host in FAKE_HOSTS}


class FakeInternetHandler(http.server.BaseHTTPRequestHandler):
    """Which fake host answers is told by the address dialled, as on the real internet."""

    protocol_version = "HTTP/1.1"
    server_version = "fake-internet"
    requests_served = 0

    def do_GET(self) -> None:
        local_address = self.connection.getsockname()[0]
        host = HOST_BY_ADDRESS.get(local_address)
        scheme = "https" if isinstance(self.connection, ssl.SSLSocket) else "http"
        body: dict[str, object] = {"error": f"no fake host on {local_address}"}
        status = 404
        if host is HTTPBIN and self.path == "/get":
            status, body = (
                200,
                {
                    "args": {},
                    "headers": dict(self.headers.items()),
                    "origin": self.client_address[0],
                    "url": f"{scheme}://{self.headers.get('Host', host.name)}{self.path}",
                },
            )
        elif host is HTTPBIN and self.path == "/ip":
            status, body = 200, {"origin": self.client_address[0]}
        elif host is INTERNAL:
            FakeInternetHandler.requests_served += 1
            status, body = (
                200,
                {
                    "requestUID": f"in:http-sid:terminus-grpc:-1-h1:80-{self.requests_served}",
                    "payload": "You cannot go there right now",
                },
            )
        elif host in (GITHUB, GOOGLE):
            title = "GitHub" if host is GITHUB else "Google"
            self.answer(200, "text/html", f"<!doctype html><title>{title} (fake)</title>\n")
            return
        self.answer(status, "application/json", json.dumps(body, indent=2) + "\n")

    def answer(self, status: int, content_type: str, text: str) -> None:
        payload = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the demo shows what the client sees."""


class FakeInternetServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up mid-handshake is normal here (denied TLS); no traceback."""


def serve_fake_internet(box: Sandbox, cert: Path, key: Path) -> None:
    """HTTP on :80 and HTTPS on :443 of every fake address, in the internet namespace."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    def listening(port: int) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.create_server(("0.0.0.0", port), backlog=64)
            sock.settimeout(None)
            return sock

        return call_in(box.internet_ns, make)

    for port, context in ((80, None), (443, tls)):
        server = FakeInternetServer(("0.0.0.0", port), FakeInternetHandler, False)
        server.socket.close()
        sock = listening(port)
        server.socket = (
            context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            if context
            else sock
        )
        thread = threading.Thread(target=server.serve_forever, name=f"fake :{port}", daemon=True)
        thread.start()
        box.cleanup.callback(server.server_close)
        box.cleanup.callback(thread.join, STOP_TIMEOUT)
        box.cleanup.callback(server.shutdown)


# ---------------------------------------------------------------- the proxy


@dataclass
class Proxy:
    box: Sandbox
    process: subprocess.Popen[bytes]
    log: Path

    def admin_get(self, path: str) -> tuple[int, bytes]:
        def connect() -> socket.socket:
            return socket.create_connection(ADMIN, timeout=2.0)

        connection = http.client.HTTPConnection(*ADMIN, timeout=2.0)
        connection.sock = call_in(self.box.client_ns, connect)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise DemoError(f"egressproxy exited with {self.process.returncode}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError):
                if self.admin_get("/ready")[0] == 200:
                    return
            time.sleep(0.05)
        raise DemoError(f"egressproxy did not answer GET /ready within {READY_TIMEOUT}s")

    def generation(self) -> int:
        status, body = self.admin_get("/config")
        if status != 200:
            raise DemoError(f"GET /config answered {status}")
        return int(json.loads(body)["generation"])

    def wait_generation(self, wanted: int) -> None:
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            if self.generation() >= wanted:
                return
            time.sleep(0.1)
        raise DemoError(
            f"the policy file changed but /config still shows generation {self.generation()}"
            f" after {RELOAD_TIMEOUT}s (expected {wanted})"
        )

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)


def start_proxy(box: Sandbox) -> tuple[Proxy, list[str]]:
    argv = ["egressproxy", "run", "--policy", str(box.policy),
            "--admin", f"{ADMIN[0]}:{ADMIN[1]}", "--namespace", "egress-test"]  # fmt: skip
    log = box.workdir / "proxy.log"
    in_client = ["ip", "netns", "exec", box.client_ns]
    as_proxy = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups"]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*in_client, *as_proxy, sys.executable, "-m", *argv],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=egressproxy_env(box),
            cwd=box.package_root,
            start_new_session=True,
        )
    proxy = Proxy(box, process, log)
    box.cleanup.callback(proxy.stop)
    (box.workdir / PROXY_PID_FILE).write_text(f"{process.pid}\n")
    proxy.wait_ready()
    return proxy, argv


def apply_policy(box: Sandbox, example: str) -> None:
    """Swap the policy file atomically, as a ConfigMap update does."""
    staged = box.policy.with_suffix(".new")
    shutil.copyfile(EXAMPLES / example, staged)
    staged.chmod(0o644)
    os.replace(staged, box.policy)


# ---------------------------------------------------------------- metrics

SAMPLE_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_metrics(text: str) -> dict[MetricKey, float]:
    samples: dict[MetricKey, float] = {}
    for line in text.splitlines():
        match = SAMPLE_LINE.match(line)
        if not match or match["name"] not in SHOWN_FAMILIES:
            continue
        labels = tuple(LABEL.findall(match["labels"] or ""))
        samples[(match["name"], labels)] = float(match["value"])
    return samples


def scrape(proxy: Proxy) -> dict[MetricKey, float]:
    status, body = proxy.admin_get("/metrics")
    if status != 200:
        raise DemoError(f"GET /metrics answered {status}")
    return parse_metrics(body.decode())


def matches(key: MetricKey, wanted: Sample) -> bool:
    family, labels = key
    return family == wanted.family and wanted.labels.items() <= dict(labels).items()


def moved_during_step(
    proxy: Proxy, before: dict[MetricKey, float], wanted: tuple[Sample, ...]
) -> dict[MetricKey, float]:
    """The samples that grew since `before`, once every wanted one has (or time is up)."""
    deadline = time.monotonic() + METRICS_TIMEOUT
    while True:
        now = scrape(proxy)
        moved = {key: value for key, value in now.items() if value > before.get(key, 0.0)}
        complete = all(any(matches(key, sample) for key in moved) for sample in wanted)
        if complete or time.monotonic() > deadline:
            return moved
        time.sleep(0.1)


GUIDE_LABEL_ORDER = (
    "parent_group", "parent_kind", "parent_namespace", "parent_name", "parent_port",
    "parent_section_name", "route_group", "route_kind", "route_namespace", "route_name",
    "hostname", "target_ip", "target_port", "http_status", "error",
)  # fmt: skip


def guide_order(label: tuple[str, str]) -> tuple[int, str]:
    name = label[0]
    return (GUIDE_LABEL_ORDER.index(name), "") if name in GUIDE_LABEL_ORDER else (99, name)


def format_sample(key: MetricKey, value: float) -> str:
    """One sample with a label per line, in the order the guide prints them."""
    family, labels = key
    ordered = sorted(labels, key=guide_order)
    shown = "\n".join(f'  {name}="{text}",' for name, text in ordered).rstrip(",")
    number = int(value) if value.is_integer() else value
    return f"{family}{{\n{shown}\n}} {number}"


# ---------------------------------------------------------------- curl


@dataclass
class Outcome:
    status: int | None
    summary: list[str] = field(default_factory=list)
    body: str = ""


def curl(box: Sandbox, url: str) -> tuple[list[str], Outcome]:
    argv = ["curl", "-sS", "-i", "--max-time", str(CURL_TIMEOUT)]
    if url.startswith("https:"):
        argv += ["--cacert", box.ca_cert.name]
    argv.append(url)
    try:
        done = subprocess.run(
            ["ip", "netns", "exec", box.client_ns, *argv],
            capture_output=True,
            timeout=CURL_TIMEOUT + 5,
            cwd=box.workdir,
        )
    except subprocess.TimeoutExpired:
        return argv, Outcome(None, [f"curl did not finish in {CURL_TIMEOUT + 5}s"])
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip() or f"curl exited {done.returncode}"
        return argv, Outcome(None, error.splitlines()[-1:])
    head, _, body = done.stdout.decode(errors="replace").partition("\r\n\r\n")
    status_line = head.splitlines()[0] if head else ""
    status_match = re.match(r"HTTP/\S+ (\d{3})", status_line)
    status = int(status_match[1]) if status_match else None
    lines = body.rstrip("\n").splitlines()
    shown = lines[:BODY_LINES] + (["…"] if len(lines) > BODY_LINES else [])
    return argv, Outcome(status, [status_line, *shown], body)


def expectation(wanted: Curl) -> str:
    if wanted.status is None:
        return "the connection is closed by the proxy"
    return f"{wanted.status}" + (f" with {wanted.body!r}" if wanted.body else "")


def met(wanted: Curl, got: Outcome) -> bool:
    return got.status == wanted.status and wanted.body in got.body


# ---------------------------------------------------------------- the run

OK, FAILED = "ok", "NOT AS THE GUIDE SAYS"


def rule(title: str) -> None:
    print(f"\n━━━ {title} " + "━" * max(3, 74 - len(title)), flush=True)


def replay(box: Sandbox, proxy: Proxy) -> int:
    """Every step of the guide; the number of checks that failed."""
    failures = 0
    generation = proxy.generation()
    for number, step in enumerate(STEPS, start=1):
        rule(f"Step {number}/{len(STEPS)}: {step.title}")
        print(f"{step.says}\npolicy: config/examples/{step.policy}", end="")
        if number == 1:
            print("  (the proxy started on it)")
        else:
            apply_policy(box, step.policy)
            generation += 1
            proxy.wait_generation(generation)
            print(f"  (hot-reloaded: policy generation {generation})")
        before = scrape(proxy)
        for wanted in step.curls:
            argv, got = curl(box, wanted.url)
            verdict = OK if met(wanted, got) else FAILED
            failures += verdict == FAILED
            print(f"\nclient$ {' '.join(argv)}")
            for line in got.summary:
                print(f"  {line}")
            print(f"  → expected {expectation(wanted)}: {verdict}")
        moved = moved_during_step(proxy, before, step.samples)
        print("\nmetrics that moved in this step (GET 127.0.0.1:4191/metrics):")
        for key in sorted(moved, key=lambda key: (SHOWN_FAMILIES.index(key[0]), key[1])):
            print(format_sample(key, moved[key]))
        for sample in step.samples:
            found = any(matches(key, sample) for key in moved)
            failures += not found
            labels = ", ".join(f'{name}="{value}"' for name, value in sample.labels.items())
            print(f"  → expected {sample.family}{{{labels}}}: {OK if found else FAILED}")
        sys.stdout.flush()
    return failures


def on_signal(signum: int, _: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def preflight() -> None:
    if os.geteuid() != 0:
        raise DemoError("the demo needs root (network namespaces, iptables, setpriv)")
    tools = ("ip", "iptables-restore", "setpriv", "curl")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise DemoError(f"missing {', '.join(missing)}: run ./scripts/setup")


def ignore_signals() -> None:
    """A second Ctrl-C must not cut the cleanup short."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def demo() -> int:
    started = time.monotonic()
    preflight()
    remove_leftovers()
    cleanup = contextlib.ExitStack()
    try:
        failures = build_and_replay(cleanup)
        rule("Cleanup")
    finally:
        ignore_signals()
        cleanup.close()
    print("proxy stopped; namespaces, /etc/netns files and the work directory removed")
    elapsed = time.monotonic() - started
    if failures:
        print(f"demo FAILED: {failures} outcome(s) not as the guide says ({elapsed:.1f}s)")
        return 1
    print(f"demo passed: every step as the Linkerd guide says ({elapsed:.1f}s)")
    return 0


def build_and_replay(cleanup: contextlib.ExitStack) -> int:
    """The sandbox, the proxy and the guide; every resource made is pushed on `cleanup`."""
    pid = os.getpid()
    box = Sandbox(f"epdemo-cli-{pid}", f"epdemo-net-{pid}", make_workdir(cleanup), cleanup)
    rule("Sandbox")
    build_namespaces(box)
    copy_package(box)
    cert, key = make_certificates(box)
    serve_fake_internet(box, cert, key)
    print(f"namespaces {box.client_ns} (client, {CLIENT_ADDRESS})"
          f" ─veth─ {box.internet_ns} (fake internet, {INTERNET_ADDRESS})")  # fmt: skip
    for host in FAKE_HOSTS:
        print(f"  {host.address:<14} {host.name}")
    print(f"client# {' '.join(install_redirect(box))}")
    apply_policy(box, STEPS[0].policy)
    proxy, argv = start_proxy(box)
    print(f"client# setpriv --reuid={PROXY_UID} {' '.join(argv)}")
    print(f"  ready (pid {proxy.process.pid})", flush=True)
    try:
        failures = replay(box, proxy)
    except DemoError:
        print(f"\nlast lines of the proxy log:\n{proxy.log_tail()}", file=sys.stderr)
        raise
    if failures:
        print(f"\nlast lines of the proxy log:\n{proxy.log_tail()}")
    return failures


def main() -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        return demo()
    except DemoError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print("\ndemo interrupted; everything it made has been removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
