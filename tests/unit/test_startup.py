"""What stops the proxy before it serves: said in one line, never a traceback."""

import argparse
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from egressproxy.cli import non_negative_int, port, port_list, positive_int
from egressproxy.netfilter import PROXY_SOURCE_PORTS, set_mark
from egressproxy.server import startup_problem
from egressproxy.settings import MAX_WORKERS, Settings
from egressproxy.upstream import SOURCE_PORT_ATTEMPTS
from tests.unit.test_metrics import free_port

REPO = Path(__file__).resolve().parents[2]


NOBODY = 65534


def start(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressproxy", "run", "--listen", f"127.0.0.1:{free_port()}",
         "--admin", f"127.0.0.1:{free_port()}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        user=user,
    )  # fmt: skip


def test_refuses_to_run_as_root_unless_told() -> None:
    assert os.geteuid() == 0, "the suite runs as root (CI does); this test is about uid 0"
    refused = start()
    assert refused.returncode == 2
    assert "refusing to run as root" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_invalid_policy_stops_the_start_with_file_and_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: EgressNetwork\n"
        "metadata: {name: n, namespace: ns}\nspec:\n  trafficPolicy: Sometimes\n"
    )
    refused = start("--allow-root", "--policy", str(policy))
    assert refused.returncode == 1
    assert f"{policy}:5:" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "No such file or directory"),
        ("directory", "Is a directory"),
        ("denied", "Permission denied"),
    ],
)
def test_an_unreadable_policy_is_named_without_a_line(
    tmp_path: Path, kind: str, reason: str
) -> None:
    """There is no line to point at: `FILE: reason`, not a line 0 that does not exist."""
    policy = tmp_path / "policy.yaml"
    if kind == "directory":
        policy.mkdir()
    elif kind == "denied":
        policy.write_text("apiVersion: egressproxy.io/v1alpha1\n")
        policy.chmod(0)
    refused = (
        start("--policy", str(policy), user=NOBODY)
        if kind == "denied"
        else start("--allow-root", "--policy", str(policy))
    )
    assert (refused.returncode, refused.stderr) == (
        1,
        f"{policy}: cannot read the policy: {reason}\n",
    )


def test_bad_flags_are_usage_errors() -> None:
    refused = start("--allow-root", "--verify-destination", "sometimes")
    assert refused.returncode == 2
    assert "--verify-destination" in refused.stderr
    assert "'sometimes' is not one of off, log, enforce" in refused.stderr


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--egress-namespace", "", "'' is no namespace name"),
        ("--egress-namespace", "Linkerd-Egress", "'Linkerd-Egress' is no namespace name"),
        ("--cluster-domain", "", "'' is no DNS domain"),
        ("--cluster-domain", "cluster..local", "'cluster..local' is no DNS domain"),
    ],
)
def test_a_namespace_or_domain_no_cluster_can_have_is_a_usage_error(
    flag: str, value: str, said: str
) -> None:
    """`--egress-namespace=$NS` with NS empty named a namespace no network can be in: the
    global egress networks silently applied to no client (traffic passing a Deny)."""
    refused = start("--allow-root", f"{flag}={value}")
    assert refused.returncode == 2
    assert f"argument {flag}: {said}" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_workers_past_the_bound_are_a_usage_error(tmp_path: Path) -> None:
    """--workers had no upper bound: a typo forked until the host ran out of memory or
    processes. (The missing policy stops the old code before it forks.)"""
    missing = tmp_path / "missing.yaml"
    refused = start("--allow-root", "--workers", "1000000", "--policy", str(missing))
    assert refused.returncode == 2, refused.stderr
    assert f"argument --workers: 1000000 is more than the {MAX_WORKERS} allowed" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_every_worker_of_the_most_gets_a_connects_tries_of_source_ports() -> None:
    assert all(
        len(PROXY_SOURCE_PORTS[index::MAX_WORKERS]) >= SOURCE_PORT_ATTEMPTS
        for index in range(MAX_WORKERS)
    )


def test_a_header_limit_past_8_mib_is_a_usage_error() -> None:
    """HTTP/2 carries the limit in a 32-bit setting: 2**32 was taken at start, and every
    h2c connection then failed with a traceback."""
    refused = start("--allow-root", "--max-header-bytes", "4294967296")
    assert refused.returncode == 2
    assert "argument --max-header-bytes: 4294967296 is more than 8388608 (8 MiB)" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_mark_wider_than_32_bits_is_a_usage_error() -> None:
    refused = start("--allow-root", "--mark", "0x100000000")
    assert refused.returncode == 2
    assert "argument --mark: '0x100000000' does not fit in 32 bits" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("mark", [0x539, 0x80000000, 0xFFFFFFFF])
def test_every_32_bit_mark_is_put_on_sockets(mark: int) -> None:
    """The upper half too (`--proxy-mark` takes it): no C-int overflow at start or later."""
    assert os.geteuid() == 0, "SO_MARK needs CAP_NET_ADMIN"
    assert startup_problem(Settings(mark=mark, allow_root=True)) == ""
    with socket.socket() as sock:
        set_mark(sock, mark)
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK, 4)
    assert struct.unpack("=I", raw)[0] == mark


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_admin_address_that_cannot_be_bound_is_one_line(workers: str) -> None:
    """Port 4191 is also Linkerd's proxy admin port: taken, it is said so, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = start("--allow-root", "--workers", workers, "--admin", f"127.0.0.1:{port}")
    assert refused.returncode == 2
    assert f"egressproxy: --admin 127.0.0.1:{port}: Address already in use\n" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_listener_that_cannot_be_bound_is_named() -> None:
    refused = start("--allow-root", "--listen", "192.0.2.1:15001")
    assert refused.returncode == 2
    assert "egressproxy: --listen 192.0.2.1:15001: Cannot assign requested address\n" in (
        refused.stderr
    )


def test_help_names_the_values_of_each_choice() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "egressproxy", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert shown.returncode == 0
    for choice in ("{off,log,enforce}", "{allow,deny}", "{text,json}"):
        assert choice in shown.stdout


def test_whole_numbers_are_decimal_or_hexadecimal() -> None:
    assert non_negative_int("010") == 10
    assert non_negative_int("0x539") == 1337
    assert positive_int("0X2a") == 42
    for text in ("1e3", "0o17", "ten", "1_000", " 7", "0x_1f", "\u0661"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a whole number"):
            non_negative_int(text)
    for text in ("-1", "-0x1"):
        with pytest.raises(argparse.ArgumentTypeError, match="must not be negative"):
            non_negative_int(text)


@pytest.mark.parametrize("text", ["1_5001", " 80", "+80", "\uff18\uff10", "80.0", ""])
def test_a_port_is_ascii_digits(text: str) -> None:
    """int() takes all of these; iptables and the manifests that carry the same ports
    take none."""
    with pytest.raises(argparse.ArgumentTypeError, match="is not a port number"):
        port(text)
    assert port_list(" 25 , 8000 - 8002 ") == {25, 8000, 8001, 8002}


def proxy_on_a_fifo(policy: Path, *args: str) -> subprocess.Popen[str]:
    """The proxy started on a policy file that is a FIFO: each read waits for a writer.
    It leads a process group of its own, its workers'."""
    os.mkfifo(policy)
    return subprocess.Popen(
        [sys.executable, "-m", "egressproxy", "run", "--allow-root", "--policy", str(policy),
         "--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
    )  # fmt: skip


def write_policy(policy: Path) -> None:
    with policy.open("w") as writer:
        writer.write("apiVersion: egressproxy.io/v1alpha1\nkind: EgressPolicy\n"
                     "metadata: {name: p}\nspec: {default: allow}\n")  # fmt: skip


def test_a_sighup_before_the_policy_is_in_is_not_fatal(tmp_path: Path) -> None:
    """The policy file is a FIFO, so loading it waits for its writer: a SIGHUP meanwhile
    (a ConfigMap update, a reload at the wrong time) leaves the start going."""
    policy = tmp_path / "policy.yaml"
    process = proxy_on_a_fifo(policy)
    try:
        time.sleep(1.0)  # past the interpreter's start, into the wait for the policy
        process.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert process.poll() is None, "ended by the SIGHUP"
        write_policy(policy)
        time.sleep(1.0)
        assert process.poll() is None
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 0, errors


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_before_the_policy_is_in_is_a_clean_exit(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """SIGTERM while the first policy loads (a large one takes seconds) killed the proxy
    by the signal (status -15): the drain contract says exit 0, and nothing serves yet."""
    process = proxy_on_a_fifo(tmp_path / "policy.yaml")
    try:
        time.sleep(1.0)  # past the interpreter's start, into the wait for the policy
        process.send_signal(stop)
        _, errors = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait(timeout=10)
    assert process.returncode == 0, errors
    assert "Traceback" not in errors


def children_of(pid: int) -> int:
    try:
        return len(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return 0


@pytest.mark.parametrize("forked", [1, 4], ids=["after-the-first-fork", "after-the-last-fork"])
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_workers_start_is_a_clean_exit(
    tmp_path: Path, stop: signal.Signals, forked: int
) -> None:
    """Once the policy is in, the supervisor forks its workers, and each sets up before its
    loop handles signals. A stop then killed the supervisor by the signal (SIGTERM), was
    swallowed by a fork hook and lost (SIGINT: still serving), or killed a worker not yet
    listening (exit 1). Now it waits for the loop: exit 0, and no process of it left."""
    policy = tmp_path / "policy.yaml"
    process = proxy_on_a_fifo(policy, "--workers", "4")
    try:
        write_policy(policy)
        deadline = time.monotonic() + 20
        while children_of(process.pid) < forked and time.monotonic() < deadline:
            time.sleep(0.0005)
        process.send_signal(stop)
        _, errors = process.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its workers too, if it failed
        process.wait(timeout=10)
    assert process.returncode == 0, errors
    assert "Traceback" not in errors and "Exception ignored" not in errors, errors
    for _ in range(100):  # its workers exit before it reaps them: none can be left
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("a process of the proxy outlived it")


def test_a_policy_read_that_never_returns_does_not_hold_the_exit(tmp_path: Path) -> None:
    """The policy is a FIFO: once it is in, the watcher's next read waits for a writer that
    never comes, as a read from a hung mount would. SIGTERM must still end the proxy."""
    policy = tmp_path / "policy.yaml"
    process = proxy_on_a_fifo(policy)
    try:
        write_policy(policy)  # waits until the proxy opens it to read
        time.sleep(3.0)  # past the watcher's first poll (1 s), now stuck opening the FIFO
        assert process.poll() is None
        process.terminate()
        _, errors = process.communicate(timeout=10)
    finally:
        process.kill()
        process.wait(timeout=10)
    assert process.returncode == 0, errors


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--namespace", "Egress-Test", "'Egress-Test' is no namespace name"),
        ("--namespace", "egress_test", "'egress_test' is no namespace name"),
        ("--service-account", "Curl", "'Curl' is no service account name"),
        ("--service-account", "curl sa", "'curl sa' is no service account name"),
    ],
)
def test_a_client_identity_no_cluster_can_have_is_a_usage_error(
    flag: str, value: str, said: str
) -> None:
    """A namespace or service account spelled as none can be (`Egress-Test`) matched no
    resource: the client silently got the global egress namespace's networks, or no OSM
    Egress naming it, instead of a one-line error. (The missing policy stops the old code.)"""
    refused = start("--allow-root", f"{flag}={value}", "--policy", "/nonexistent/policy.yaml")
    assert refused.returncode == 2, refused.stderr
    assert f"argument {flag}: {said}" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_client_identity_from_the_environment_is_blamed_on_the_variable() -> None:
    """The user never typed --namespace: the error names what to fix, POD_NAMESPACE, under
    the usage of the command that read it."""
    assert os.environ.get("POD_NAMESPACE") is None
    refused = subprocess.run(
        [sys.executable, "-m", "egressproxy", "check", "--policy", "/nonexistent/policy.yaml"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "POD_NAMESPACE": "Egress-Test"},
    )
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("usage: egressproxy check "), refused.stderr
    assert refused.stderr.splitlines()[-1] == (
        "egressproxy check: error: environment variable POD_NAMESPACE: 'Egress-Test' is no "
        "namespace name (lower-case letters, digits and '-', at most 63)"
    )


HELD_AT_IMPORT = """
import importlib.abc, signal, sys
from egressproxy.signals import CONTROLS

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("egressproxy.cli", "uvloop") and name not in seen:
            seen.add(name)
            held = CONTROLS <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
            print(name, "held" if held else "open", flush=True)
        return None

seen = set()
sys.meta_path.insert(0, Watch())
sys.argv = ["egressproxy", *sys.argv[1:]]
from egressproxy.__main__ import entry
sys.exit(entry())
"""


@pytest.mark.parametrize("command", ["run", "check"])
def test_run_holds_its_stop_and_reload_signals_before_the_rest_is_imported(
    tmp_path: Path, command: str
) -> None:
    """The imports before the loop's handlers (the CLI, uvloop, h2, prometheus-client) took
    about 0.1 s, and a SIGTERM or SIGHUP then (systemd's start then reload) killed the
    proxy by the signal. `run` holds them from its first line; `check`, which has no
    handlers, leaves Ctrl-C working."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: egressproxy.io/v1alpha1\nkind: EgressPolicy\n"
        "metadata: {name: p}\nspec: {default: allow}\n"
    )
    arguments = ["--policy", str(policy)]
    if command == "run":
        arguments += ["--listen", "127.0.0.1:1", "--admin", "127.0.0.1:1"]  # refused as root
    done = subprocess.run(
        [sys.executable, "-c", HELD_AT_IMPORT, command, *arguments],
        capture_output=True, text=True, timeout=30, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    word = "held" if command == "run" else "open"
    assert done.stdout.splitlines()[0] == f"egressproxy.cli {word}", done.stderr
    if command == "run":
        assert done.stdout.splitlines() == ["egressproxy.cli held", "uvloop held"], done.stderr
