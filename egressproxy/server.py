"""Process life: listeners, workers, signals, drain."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import math
import os
import resource
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator

import uvloop
from prometheus_client import CollectorRegistry

from egressproxy import accesslog, admin, metrics, splice, upstream
from egressproxy.flow import Flow, FlowContext, OpenFlows
from egressproxy.netfilter import read_source_ports_conflict, set_mark
from egressproxy.policy.errors import PolicyError
from egressproxy.policy.store import PolicyStore
from egressproxy.records import Accounting, FlowRecord, RequestRecord
from egressproxy.settings import Endpoint, Settings
from egressproxy.signals import CONTROLS, HURRY, STOPS

log = logging.getLogger("egressproxy.server")

LISTEN_BACKLOG = 4096
FDS_PER_CONNECTION = 2
FD_RESERVE = 128
"""Descriptors kept for the admin server, policy reloads, logs and the loop itself."""
PIPE_SHARE = 32
"""Pipes for splicing get at most one descriptor in PIPE_SHARE beyond the reserve."""
PR_SET_PDEATHSIG = 1
"""prctl(2): the signal a worker gets when its supervisor dies."""
WORKER_SIGHUP = "SIGHUP ignored by a worker: send it to the supervisor (pid %d) to reload"
WRITE_LOCK = "stderr.lock"
"""The file in the run's metrics directory its processes hold locked while they write."""


def main(settings: Settings) -> int:
    # Held until the loop's handlers take over (serve, _supervisor: workers inherit the
    # mask across fork), so that a stop or reload during start-up is acted on once the
    # proxy can, and never kills a half-made process. Blocked before the log's writer
    # thread starts, which inherits the mask and so never takes them for the main thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROLS)
    accesslog.setup_logging(settings)
    owner = os.getpid()
    metrics_dir = None
    try:
        problem = startup_problem(settings)
        if problem:
            print(f"egressproxy: {problem}", file=sys.stderr)
            return 2
        raise_open_file_limit()
        conflict = read_source_ports_conflict()
        if conflict:
            log.warning("%s", conflict)
        try:
            metrics_dir = metrics.keep_values(settings.workers)
        except OSError as error:
            print(f"egressproxy: {error}", file=sys.stderr)
            return 2
        if metrics_dir is not None:
            accesslog.share_writes(os.path.join(metrics_dir, WRITE_LOCK))
        registry = CollectorRegistry()
        meters = metrics.Metrics(registry, max_hostnames=settings.max_hostnames, shared=metrics_dir)
        if metrics_dir is not None:
            registry = metrics.multiprocess_registry(metrics_dir)
        store = PolicyStore(
            settings, on_reload=lambda ok: meters.policy_reloaded(ok, store.current.generation)
        )
        try:
            with stopped_cleanly_by_signals():
                store.load_initial()
        except PolicyError as error:
            print(error, file=sys.stderr)
            return 1
        except StoppedBeforeStart:
            log.info("stopped while loading the policy")
            return 0
        meters.policy_loaded(store.current.generation)
        listeners = []
        for endpoint in settings.listen:
            try:
                listeners.append(bind_listener(endpoint, settings.listen))
            except OSError as error:
                print(f"egressproxy: --listen {endpoint}: {error.strerror}", file=sys.stderr)
                return 2
        try:
            admin_socket = admin.bind_admin(settings.admin)
        except OSError as error:
            print(f"egressproxy: --admin {settings.admin}: {error.strerror}", file=sys.stderr)
            return 2
        if os.geteuid() == 0 and settings.mark is None:
            log.warning(
                "running as root without --mark: the redirect must let uid 0 go direct "
                "(egressproxy iptables install --proxy-uid 0), else each connection comes "
                "back to the proxy and is closed as a loop"
            )
        accounting = Reporting(meters, accesslog.AccessLog())
        if settings.workers == 1:
            return uvloop.run(
                serve(settings, store, listeners, accounting, registry, admin_socket=admin_socket)
            )
        return supervise(
            settings, store, listeners, admin_socket, accounting, registry, meters.policy_loaded
        )
    finally:
        if metrics_dir is not None and os.getpid() == owner:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        accesslog.shutdown_logging()


class StoppedBeforeStart(Exception):
    """SIGTERM or SIGINT while the first policy loads (seconds for a large one, forever
    from a hung mount): nothing serves yet, so stopping is a clean exit, not death by
    the signal."""


def _stop_before_start(signum: int, frame: object) -> None:
    raise StoppedBeforeStart


@contextlib.contextmanager
def stopped_cleanly_by_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGINT raise StoppedBeforeStart (a blocked read returns)."""
    previous = {signum: signal.signal(signum, _stop_before_start) for signum in STOPS}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def startup_problem(settings: Settings) -> str:
    """Why the proxy must not start as configured, or ""."""
    if os.geteuid() == 0 and not settings.allow_root:
        return (
            "refusing to run as root: the redirect tells the proxy's own traffic apart by uid "
            "or mark; run as a dedicated user (or pass --allow-root with --mark)"
        )
    if settings.mark is not None:
        with socket.socket() as probe:
            try:
                set_mark(probe, settings.mark)
            except PermissionError:
                return (
                    "--mark needs CAP_NET_ADMIN, or CAP_NET_RAW on Linux 5.17 and later"
                    " (setting SO_MARK was refused)"
                )
    return ""


def raise_open_file_limit() -> None:
    """Each connection holds two descriptors; take the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def bind_listener(endpoint: Endpoint, all_endpoints: tuple[Endpoint, ...]) -> socket.socket:
    """A listening socket shared by every worker through SO_REUSEPORT.

    A v6 wildcard beside a v4 listener on the same port takes v6 only; alone it
    is dual-stack and v4 clients arrive as v4-mapped addresses.
    """
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # TCP urgent data stays in the stream, where the relays pass it on (accepted
        # sockets inherit it): else a read drops the urgent byte.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        if family == socket.AF_INET6:
            has_v4 = any(
                ":" not in other.host and other.port == endpoint.port for other in all_endpoints
            )
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if has_v4 else 0)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Reporting:
    """What the data plane reports goes to the metrics and to the access log."""

    def __init__(self, meters: metrics.Metrics, access_log: accesslog.AccessLog) -> None:
        self.meters = meters
        self.access_log = access_log

    def connection_opened(self) -> None:
        self.meters.connection_opened()

    def connection_decided(self, record: FlowRecord) -> None:
        self.meters.connection_decided(record)

    def connection_closed(self, record: FlowRecord) -> None:
        self.meters.connection_closed(record)
        self.access_log.connection_closed(record)

    def request_finished(self, record: RequestRecord) -> None:
        self.meters.request_finished(record)
        self.access_log.request_finished(record)

    def upstream_failed(self, error: str) -> None:
        self.meters.upstream_failed(error)

    def destination_unconfirmed(self, error: str, hostname: str, mode: str, times: int) -> None:
        self.meters.destination_unconfirmed(error, hostname, mode, times)

    def tasks_counted(self, alive: int) -> None:
        self.meters.tasks.set(alive)

    def policy_reloaded(self, ok: bool, generation: int) -> None:
        self.meters.policy_reloaded(ok, generation)


TASK_COUNT_INTERVAL = 1.0


def count_tasks(accounting: Accounting) -> None:
    """Report the loop's live tasks now and every TASK_COUNT_INTERVAL from now on."""
    loop = asyncio.get_running_loop()
    accounting.tasks_counted(len(asyncio.all_tasks(loop)))
    loop.call_later(TASK_COUNT_INTERVAL, count_tasks, accounting)


async def serve(
    settings: Settings,
    store: PolicyStore,
    listeners: list[socket.socket],
    accounting: Accounting,
    registry: CollectorRegistry,
    *,
    admin_socket: socket.socket | None,
    on_listening: Callable[[], None] | None = None,
    policy_feed: int | None = None,
) -> int:
    """Run one worker until SIGTERM, then drain. A worker of --workers (policy_feed: the
    pipe its supervisor sends policies down) neither reads the file nor reloads on SIGHUP."""
    loop = asyncio.get_running_loop()
    stop, hurry = asyncio.Event(), asyncio.Event()

    def stop_signal() -> None:
        """The first SIGTERM or SIGINT drains; another ends the drain at once (an
        operator's second Ctrl-C, a second `kill`). A worker hears that from its
        supervisor alone (HURRY)."""
        (hurry if stop.is_set() and policy_feed is None else stop).set()

    def hurry_signal() -> None:
        stop.set()
        hurry.set()

    for signum in STOPS:
        loop.add_signal_handler(signum, stop_signal)
    if policy_feed is None:
        loop.add_signal_handler(signal.SIGHUP, store.request_reload)
        watcher = loop.create_task(store.watch(), name="policy watch")
    else:
        loop.add_signal_handler(HURRY, hurry_signal)
        loop.add_signal_handler(signal.SIGHUP, log.info, WORKER_SIGHUP, os.getppid())
        watcher = loop.create_task(store.follow(policy_feed), name="policy feed")
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROLS)
    acceptor = Acceptor(listeners)
    limit, pipes = descriptor_budget(settings.max_connections)
    open_flows = OpenFlows(limit, on_full=acceptor.pause, on_room=acceptor.resume)
    context = FlowContext(settings, store, open_flows, accounting, max_pipes=pipes)
    health = admin.Health()
    admin_server = None
    if admin_socket is not None:
        admin_server = await admin.start_admin(
            admin_socket, admin.base_handlers(health, store, registry)
        )
    await acceptor.start(lambda: Flow(context))
    count_tasks(accounting)
    # What start-up made (modules, the policy index) lives as long as the worker: the full
    # collections that every few thousand connections bring need not walk it each time.
    gc.freeze()
    health.listening = True
    log.info("listening on %s", ", ".join(str(endpoint) for endpoint in settings.listen))
    if on_listening is not None:
        on_listening()
    await stop.wait()
    health.draining = True
    context.draining = True
    for flow in list(open_flows.flows):
        flow.drain()
    log.info("draining %d open connections (up to %ss)", len(open_flows), settings.drain_timeout)
    acceptor.close()
    await drain(open_flows, settings.drain_timeout, hurry)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    if admin_server is not None:
        admin_server.close()
    context.splicer.close()
    context.resolver.close()
    # Held again before the loop gives the signals back their default (ending the
    # process): a stop or a hurry that comes now is one too late, not a death by signal.
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROLS)
    log.info("stopped")
    return 0


def descriptor_budget(max_connections: int) -> tuple[int, int]:
    """Connections (--max-connections, lowered so two descriptors each always fit the
    open-file limit) and pipes for splicing (a share of the descriptors, two each).

    Running out of descriptors would make libuv accept and drop queued clients;
    pausing below the limit leaves them waiting in the kernel's backlog instead.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return max_connections, splice.MAX_PIPES
    spare = max(0, hard - FD_RESERVE)
    pipes = min(splice.MAX_PIPES, spare // PIPE_SHARE)
    fits = max(1, (spare - 2 * pipes) // FDS_PER_CONNECTION)
    if fits < max_connections:
        log.warning(
            "--max-connections %d lowered to %d: the open-file limit is %d",
            max_connections,
            fits,
            hard,
        )
    return min(max_connections, fits), pipes


PAUSE_LOG_INTERVAL = 10.0
"""At most one "accepting paused" line this often (with the count of those left unsaid)."""
RESUME_RETRY_INTERVAL = 0.5
"""How soon accepting is tried again when resuming found no descriptor to spare."""


class Acceptor:
    """Accepting on the listeners, pausable without refusing anyone.

    uvloop servers cannot pause, and closing one closes its socket, so each
    server gets a duplicate descriptor: closing the server stops accepting
    while the original socket keeps listening and the kernel queues new clients.
    """

    def __init__(self, listeners: list[socket.socket]) -> None:
        self.listeners = listeners
        self.servers: list[asyncio.AbstractServer] = []
        self.factory: Callable[[], asyncio.Protocol] | None = None
        self.resuming: asyncio.Task[None] | None = None
        self.paused = False
        self.closed = False
        self.pauses_unsaid = 0
        """Pauses since the last one logged: at the limit, a pause and a resume come with
        every connection that ends, and a line for each would flood the log."""
        self.pause_said_at = -math.inf

    async def start(self, factory: Callable[[], asyncio.Protocol]) -> None:
        self.factory = factory
        loop = asyncio.get_running_loop()
        for sock in self.listeners:
            server = await loop.create_server(factory, sock=sock.dup(), backlog=LISTEN_BACKLOG)
            self.servers.append(server)

    def pause(self) -> None:
        if self.paused or self.closed:
            return
        self.paused = True
        self.pauses_unsaid += 1
        now = time.monotonic()
        if now - self.pause_said_at >= PAUSE_LOG_INTERVAL:
            since = f" ({self.pauses_unsaid} times since the last line)"
            log.warning(
                "connection limit reached: accepting paused%s",
                since if self.pauses_unsaid > 1 else "",
            )
            self.pause_said_at, self.pauses_unsaid = now, 0
        if self.resuming is not None:
            self.resuming.cancel()
        for server in self.servers:
            server.close()
        self.servers = []

    def resume(self) -> None:
        if not self.paused or self.closed or self.factory is None:
            return
        self.paused = False
        if not self.pauses_unsaid:  # the pause it ends was logged
            log.info("below the connection limit: accepting again")
        self.resuming = asyncio.get_running_loop().create_task(
            self._accept_again(self.factory), name="resume accepting"
        )

    async def _accept_again(self, factory: Callable[[], asyncio.Protocol]) -> None:
        """Start the servers again, until it works: with the descriptors all taken (a
        duplicate per listener is needed), giving up would leave the worker never
        accepting again while its /ready still says 200."""
        failures = 0
        while not self.paused and not self.closed:
            try:
                await self.start(factory)
                if failures:
                    log.warning("accepting again after %d failed tries", failures)
                return
            except OSError as error:
                for server in self.servers:
                    server.close()
                self.servers = []
                if not failures:
                    log.warning(
                        "cannot accept again (%s): retrying every %ss",
                        error.strerror,
                        RESUME_RETRY_INTERVAL,
                    )
                failures += 1
            await asyncio.sleep(RESUME_RETRY_INTERVAL)

    def close(self) -> None:
        """Stop for good: new clients are refused from now on."""
        self.closed = True
        if self.resuming is not None:
            self.resuming.cancel()
        for server in self.servers:
            server.close()
        for sock in self.listeners:
            sock.close()


async def drain(open_flows: OpenFlows, timeout: float, hurry: asyncio.Event) -> None:
    """Let open connections finish; cut whatever is left when the time is up, or at once
    when hurried."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while open_flows and loop.time() < deadline and not hurry.is_set():
        await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
    if open_flows and hurry.is_set():
        log.info("stopping now: cutting %d open connections", len(open_flows))
    for flow in list(open_flows.flows):
        flow.abort()
    await asyncio.sleep(0)


def supervise(
    settings: Settings,
    store: PolicyStore,
    listeners: list[socket.socket],
    admin_socket: socket.socket,
    accounting: Accounting,
    registry: CollectorRegistry,
    generation_in_force: Callable[[int], None],
) -> int:
    """--workers N: N forked workers, each with its own SO_REUSEPORT listeners (the kernel
    spreads new connections over them); this process serves admin.

    This process's listeners, bound first so a taken port is reported at once, become
    worker 0's: a connection the kernel queued on them before the workers listened is
    accepted there, where a listener closed with it still queued would reset it.

    This process alone reloads the policy, and sends each one to the workers down a
    pipe each (store.follow); it alone counts the reloads. Each worker reports the
    generation it has in force (generation_in_force), and the gauge shows the lowest: a
    worker still compiling, or one that could not, runs the older policy meanwhile.
    """
    ready_read, ready_write = os.pipe()
    children: list[int] = []
    feeds: list[int] = []
    supervisor = os.getpid()
    for index in range(settings.workers):
        try:
            feed_read, feed_write = os.pipe()
        except OSError as error:
            return _not_started(settings.workers, index, error, children)
        try:
            pid = os.fork()
        except OSError as error:
            os.close(feed_read)
            os.close(feed_write)
            return _not_started(settings.workers, index, error, children)
        if pid == 0:
            code = 1
            try:
                _stop_with(supervisor)
                for descriptor in (ready_read, feed_write, *feeds):
                    os.close(descriptor)
                store.on_reload = None
                store.on_adopted = generation_in_force
                generation_in_force(store.current.generation)
                upstream.take_worker_share(index, settings.workers)
                admin_socket.close()
                if index == 0:
                    own = listeners
                else:
                    for sock in listeners:
                        sock.close()
                    own = [bind_listener(endpoint, settings.listen) for endpoint in settings.listen]
                code = uvloop.run(
                    serve(
                        settings,
                        store,
                        own,
                        accounting,
                        registry,
                        admin_socket=None,
                        on_listening=lambda: _signal_ready(ready_write),
                        policy_feed=feed_read,
                    )
                )
            except Exception:  # os._exit below would leave it unsaid
                log.exception("worker %d failed", os.getpid())
            finally:
                accesslog.shutdown_logging()
                os._exit(code)
        os.close(feed_read)
        feeds.append(feed_write)
        children.append(pid)
    os.close(ready_write)
    for sock in listeners:
        sock.close()
    return uvloop.run(_supervisor(store, registry, children, ready_read, feeds, admin_socket))


def _not_started(workers: int, index: int, error: OSError, children: list[int]) -> int:
    """The system refused a worker (a limit on processes, descriptors or memory): one line,
    and the workers already made drain and are reaped before the supervisor leaves, as
    their metrics directory goes with it."""
    # fork() reports errno 0 when the fork hooks' own thread could not start either
    reason = error.strerror if error.errno else "no new process could be made"
    print(
        f"egressproxy: --workers {workers}: cannot start worker {index + 1}: {reason}",
        file=sys.stderr,
    )
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in children:
        os.waitpid(pid, 0)
    return 1


def _signal_ready(ready_write: int) -> None:
    os.write(ready_write, b".")


async def _supervisor(
    store: PolicyStore,
    registry: CollectorRegistry,
    children: list[int],
    ready_read: int,
    feeds: list[int],
    admin_socket: socket.socket,
) -> int:
    loop = asyncio.get_running_loop()
    health = admin.Health()
    stop = asyncio.Event()

    def forward() -> None:
        """The first stop drains the workers; another (an operator's second) hurries them."""
        word = HURRY if stop.is_set() else signal.SIGTERM
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, word)
        stop.set()

    for signum in STOPS:
        loop.add_signal_handler(signum, forward)
    loop.add_signal_handler(signal.SIGHUP, store.request_reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROLS)
    for feed in feeds:
        transport, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(feed, "wb", buffering=0)
        )
        store.feeds.append(transport)
    exit_codes: dict[int, int] = {}
    died_serving: list[int] = []

    async def reap() -> None:
        """A worker that exits while serving stops them all: the proxy then exits non-zero
        and its supervisor (systemd, the kubelet) restarts it whole."""
        while children:  # every worker, the last ones to drain included
            pid, status = await loop.run_in_executor(None, os.wait)
            exit_codes[pid] = os.waitstatus_to_exitcode(status)
            children.remove(pid)
            metrics.forget_worker(pid)
            if not stop.is_set():
                died_serving.append(pid)
                log.error("worker %d exited (%d); stopping the others", pid, exit_codes[pid])
                forward()

    worker_count = len(children)
    reaper = loop.create_task(reap(), name="reap workers")
    admin_server = await admin.start_admin(
        admin_socket, admin.base_handlers(health, store, registry)
    )
    watcher = loop.create_task(store.watch(), name="policy watch")
    started = 0
    while started < worker_count:
        chunk = await loop.run_in_executor(None, os.read, ready_read, worker_count)
        if not chunk:
            break
        started += len(chunk)
    os.close(ready_read)
    if started < worker_count and not stop.is_set():
        log.error("a worker failed to start; stopping the others")
        forward()
    health.listening = started == worker_count
    await stop.wait()
    health.draining = True
    await reaper
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    admin_server.close()
    for transport in store.feeds:
        transport.close()
    failed = died_serving or [pid for pid, code in exit_codes.items() if code != 0]
    return 1 if failed else 0


def _stop_with(supervisor: int) -> None:
    """A worker gets SIGTERM (and drains) when its supervisor dies, even by SIGKILL: left
    serving, orphans would share the port with the next proxy, its scrapes missing them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
