"""Fixtures of the end-to-end world; see world.py for the picture.

    world          session: namespaces, fake internet, test CA, the redirect
    proxy_launcher session: the world-readable copy of the package
    proxy          per test: proxy(policy_text=None, *args, ready=True) -> Proxy

A failing test's report carries the log of every proxy it started and what
servers.py logged meanwhile.
"""

from __future__ import annotations

import signal
from collections.abc import Generator, Iterator

import pytest

from .proxy_process import Proxy, ProxyLauncher, StartProxy
from .world import STOP_TIMEOUT, World, WorldError, built_world

PROXIES = pytest.StashKey[list[Proxy]]()
SERVERS_LOG_START = pytest.StashKey[int]()
LOG_TAIL = 20_000
TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    problem = ""
    try:
        with built_world() as built:
            yield built
    except WorldError as error:
        problem = str(error)
    if problem:
        pytest.fail(f"cannot build the e2e network world: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def proxy_launcher(world: World) -> Iterator[ProxyLauncher]:
    launcher = ProxyLauncher(world)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture
def proxy(proxy_launcher: ProxyLauncher, request: pytest.FixtureRequest) -> Iterator[StartProxy]:
    """Start `egressproxy run` in the client namespace; stopped (and checked) at teardown.

    proxy(policy_text=None, *args, ready=True, as_root=False, output_unread=False):
    policy_text None runs the bundled policy; args are extra `run` flags; ready=False
    returns at once instead of waiting for GET /ready; as_root runs it as uid 0;
    output_unread gives it a pipe nobody reads for its output instead of the log. Teardown
    fails the test if a proxy exited without the test asking, or logged a traceback.
    """
    started: list[Proxy] = []
    request.node.stash[PROXIES] = started

    def start(
        policy_text: str | None = None,
        *args: str,
        ready: bool = True,
        as_root: bool = False,
        output_unread: bool = False,
    ) -> Proxy:
        launched = proxy_launcher.start(policy_text, args, ready, as_root, output_unread)
        started.append(launched)
        return launched

    yield start
    problems = []
    for launched in started:
        if launched.exit_expected:
            launched.stop(signal.SIGKILL)
        elif launched.returncode is not None:
            problems.append(f"proxy {launched.pid} exited by itself with {launched.returncode}")
        else:
            code = launched.stop(signal.SIGTERM)
            if code == -signal.SIGKILL:
                problems.append(
                    f"proxy {launched.pid} still draining {STOP_TIMEOUT}s after SIGTERM, although"
                    " the test had closed its connections (a connection never finished?)"
                )
            elif code != 0:
                problems.append(f"proxy {launched.pid} exited with {code} on SIGTERM")
        if TRACEBACK in launched.log_text():
            problems.append(f"proxy {launched.pid} logged a traceback")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    world = item.funcargs.get("world") if isinstance(item, pytest.Function) else None
    if report.when == "setup" and isinstance(world, World):
        item.stash[SERVERS_LOG_START] = len(world.servers_log_text())
    if report.failed:
        for launched in item.stash.get(PROXIES, []):
            report.sections.append(
                (f"egressproxy (pid {launched.pid}) log", launched.log_text()[-LOG_TAIL:])
            )
        if isinstance(world, World):
            during_test = world.servers_log_text()[item.stash.get(SERVERS_LOG_START, 0) :]
            if during_test:
                report.sections.append(("servers.py log", during_test[-LOG_TAIL:]))
    return report
