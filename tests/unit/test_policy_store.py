"""Hot reload: generation +1 per change, unchanged content a no-op, a broken file keeps the old;
the file is read and compiled off the loop, one reload at a time."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from egressproxy import admin
from egressproxy.policy import store as store_module
from egressproxy.policy.decision import Action, ConnectionFacts, Destination, Detected
from egressproxy.policy.errors import PolicyError
from egressproxy.policy.index import PolicyIndex, compile_policy
from egressproxy.policy.loader import load_policy_text
from egressproxy.policy.model import Model
from egressproxy.policy.store import PolicyStore
from egressproxy.settings import Endpoint, Settings

POLICY = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {{namespace: linkerd-egress, name: all}}
spec:
  trafficPolicy: {policy}
"""
WARNS_AT_LOAD = """\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: linkerd-egress, name: no-group}
spec:
  parentRefs: [{name: all, kind: EgressNetwork, port: 80}]
"""
"""A route whose parentRef has no group: loading it logs a warning."""
FACTS = ConnectionFacts(Destination(ipaddress.ip_address("203.0.113.1"), 22), Detected.OPAQUE, None)


def write(path: Path, policy: str) -> None:
    path.write_text(POLICY.format(policy=policy))


def action(store: PolicyStore) -> Action:
    return store.current.index.decide_connection(FACTS).action


def reload(store: PolicyStore, force: bool = False) -> bool:
    return asyncio.run(store.reload(force))


def make_store(path: Path) -> tuple[PolicyStore, list[bool]]:
    reported: list[bool] = []
    store = PolicyStore(Settings(policy_file=path), on_reload=reported.append)
    store.load_initial()
    return store, reported


def test_reload_bumps_generation_once_per_change(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write(path, "Allow")
    store, reported = make_store(path)
    first = store.current
    assert (first.generation, action(store)) == (1, Action.PASS)
    assert reload(store, force=False) is False
    assert store.current is first and reported == []
    write(path, "Deny")
    assert reload(store, force=False) is True
    assert (store.current.generation, action(store), reported) == (2, Action.DENY, [True])
    assert reload(store, force=False) is False
    assert reload(store, force=True) is True
    assert store.current.generation == 3
    assert first.index.decide_connection(FACTS).action == Action.PASS


def test_broken_file_keeps_the_old_policy_and_logs_file_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    write(path, "Allow")
    store, reported = make_store(path)
    write(path, "Sometimes")
    with caplog.at_level(logging.ERROR, logger="egressproxy.policy.store"):
        assert reload(store, force=False) is False
        assert reload(store, force=False) is False
    assert (store.current.generation, action(store), reported) == (1, Action.PASS, [False])
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}:5: EgressNetwork linkerd-egress/all.spec.trafficPolicy: "
        "'Sometimes' is not one of Allow, Deny"
    ]
    path.unlink()
    assert reload(store, force=True) is False
    assert reported == [False, False]
    write(path, "Deny")
    assert reload(store, force=False) is True
    assert store.current.generation == 2


A_CONFIG_MAP = """\
apiVersion: v1
kind: ConfigMap
metadata: {namespace: app, name: settings}
data: {level: debug}
---
"""
"""A document of no egress meaning: alone, a policy with no network, which passes all."""


@pytest.mark.parametrize("first_part", ["", A_CONFIG_MAP], ids=["empty", "first_document"])
def test_a_file_read_while_written_in_place_is_not_put_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_part: str
) -> None:
    """An editor or `cat >` writes in place: a poll that reads the file empty, or with only
    its first documents (a valid policy that allows what the whole one denies), waits for
    the write to end instead of putting that in force until the next poll."""
    monkeypatch.setattr(store_module, "SETTLE_SECONDS", 0.5)  # the rest comes well within
    path = tmp_path / "policy.yaml"
    write(path, "Allow")
    store, reported = make_store(path)
    whole = A_CONFIG_MAP + POLICY.format(policy="Deny")

    async def written_in_place() -> bool:
        with path.open("w") as policy:
            policy.write(first_part)
            policy.flush()
            reloading = asyncio.create_task(store.reload())
            await asyncio.sleep(0.05)
            policy.write(whole[len(first_part) :])
        return await reloading

    assert asyncio.run(written_in_place()) is True
    assert (store.current.generation, action(store), reported) == (2, Action.DENY, [True])
    assert reload(store) is False


@pytest.mark.parametrize("force", [False, True], ids=["changed", "sighup"])
def test_a_file_gone_while_a_reload_settles_is_no_empty_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    """Two failed reads agreed as empty content: a policy without networks, which passes
    everything, was put in force in place of a Deny, and counted as a good reload."""
    monkeypatch.setattr(store_module, "SETTLE_SECONDS", 0.2)
    path = tmp_path / "policy.yaml"
    write(path, "Deny")
    store, reported = make_store(path)
    if not force:
        path.write_text("# edited\n" + POLICY.format(policy="Deny"))

    async def removed_while_settling() -> bool:
        reloading = asyncio.create_task(store.reload(force))
        await asyncio.sleep(0.1)  # its first read is done, the second not yet
        path.unlink()
        return await reloading

    assert asyncio.run(removed_while_settling()) is False
    assert (store.current.generation, action(store), reported) == (1, Action.DENY, [])
    assert reload(store, force=True) is False, "gone: an error, the Deny still in force"
    assert (action(store), reported) == (Action.DENY, [False])


def test_a_sighup_while_the_file_is_written_waits_for_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forced reload of a file still changing after SETTLE_READS reads put its first
    read in force (here a ConfigMap alone: a policy that passes everything); it is owed
    to the next check instead, which finds the whole file."""
    monkeypatch.setattr(store_module, "SETTLE_SECONDS", 0.05)
    path = tmp_path / "policy.yaml"
    write(path, "Deny")
    store, reported = make_store(path)
    seen: list[Action] = []

    async def sighup_during_a_slow_write() -> None:
        watching = asyncio.create_task(store.watch(interval=0.3))
        try:
            with path.open("w") as policy:
                policy.write(A_CONFIG_MAP)
                policy.flush()
                store.request_reload()
                for _ in range(12):  # longer than a reload waits for the file to settle
                    await asyncio.sleep(0.04)
                    seen.append(action(store))
                    policy.write("# more\n")
                    policy.flush()
                policy.write(POLICY.format(policy="Deny"))
            await wait_for_generation(store, 2)
        finally:
            watching.cancel()

    asyncio.run(sighup_during_a_slow_write())
    assert set(seen) == {Action.DENY}
    assert (store.current.generation, action(store), reported) == (2, Action.DENY, [True])


def test_a_reload_that_fails_unforeseen_does_not_end_the_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception other than PolicyError (memory, a bug) ended watch(): hot reload
    stopped for the life of the process, and nothing said so. It is logged and counted
    as a failed reload, and the next check tries the change again."""
    monkeypatch.setattr(store_module, "SETTLE_SECONDS", 0.01)
    path = tmp_path / "policy.yaml"
    write(path, "Allow")
    store, reported = make_store(path)
    compile_policy_file = store._compile
    failures = iter([MemoryError()])

    def compile_once_failing(data: bytes) -> PolicyIndex:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return compile_policy_file(data)

    monkeypatch.setattr(store, "_compile", compile_once_failing)

    async def changed() -> None:
        watching = asyncio.create_task(store.watch(interval=0.05))
        try:
            write(path, "Deny")
            await wait_for_generation(store, 2)
        finally:
            watching.cancel()

    with caplog.at_level(logging.ERROR, logger="egressproxy.policy.store"):
        asyncio.run(changed())
    assert (action(store), reported) == (Action.DENY, [False, True])
    assert any("MemoryError" in (record.exc_text or "") for record in caplog.records)


def test_a_file_back_as_it_was_after_a_failed_reload_is_a_change_and_reloads(
    tmp_path: Path,
) -> None:
    """INTERFACE: a change of content is one reload. A bad edit reverted (or a file gone
    for a moment, then back) changes the file from what was last read: it reloads, so the
    good reload counted after the failed one tells a dashboard the failure is over (it
    was a silent no-op, and the error stood alone). The same content again is still none."""
    path = tmp_path / "policy.yaml"
    write(path, "Deny")
    store, reported = make_store(path)
    good = path.read_text()
    path.write_text(good.replace("trafficPolicy", "trafficPolicyy"))
    assert reload(store) is False
    assert (store.current.generation, reported) == (1, [False])
    path.write_text(good)
    assert reload(store) is True
    assert reload(store) is False, "the same content again"
    assert (store.current.generation, reported, action(store)) == (2, [False, True], Action.DENY)
    path.rename(tmp_path / "away.yaml")
    assert reload(store) is False
    (tmp_path / "away.yaml").rename(path)
    assert reload(store) is True
    assert (store.current.generation, reported) == (3, [False, True, False, True])


def test_an_unreadable_file_on_reload_is_named_without_a_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    write(path, "Deny")
    store, reported = make_store(path)
    path.unlink()
    with caplog.at_level(logging.ERROR, logger="egressproxy.policy.store"):
        assert reload(store, force=True) is False
        path.mkdir()
        assert reload(store, force=True) is False
    assert (store.current.generation, action(store), reported) == (1, Action.DENY, [False, False])
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: cannot read the policy: No such file or directory",
        f"{path}: cannot read the policy: Is a directory",
    ]


def test_initial_load_raises(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("kind: [")
    with pytest.raises(PolicyError, match=r"policy\.yaml:1: YAML syntax"):
        PolicyStore(Settings(policy_file=path)).load_initial()


def configmap(directory: Path, version: str, policy: str) -> None:
    """Lay out a ConfigMap volume: policy.yaml → ..data/policy.yaml, ..data → ..VERSION."""
    target = directory / f"..{version}"
    target.mkdir()
    write(target / "policy.yaml", policy)
    link = directory / "..data_tmp"
    link.symlink_to(target.name)
    os.replace(link, directory / "..data")
    if not (directory / "policy.yaml").is_symlink():
        (directory / "policy.yaml").symlink_to("..data/policy.yaml")


def test_watch_sees_configmap_symlink_swap_and_atomic_rename(tmp_path: Path) -> None:
    configmap(tmp_path, "v1", "Allow")
    store, reported = make_store(tmp_path / "policy.yaml")

    async def scenario() -> None:
        watcher = asyncio.create_task(store.watch(interval=0.01))
        try:
            configmap(tmp_path, "v2", "Deny")
            await wait_for_generation(store, 2)
            assert action(store) == Action.DENY
            await asyncio.sleep(0.05)
            assert store.current.generation == 2
        finally:
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher

    asyncio.run(scenario())
    assert reported == [True]

    plain = tmp_path / "plain.yaml"
    write(plain, "Deny")
    renamed, _ = make_store(plain)
    replacement = tmp_path / "new.yaml"
    write(replacement, "Allow")
    os.replace(replacement, plain)
    assert reload(renamed, force=False) is True
    assert action(renamed) == Action.PASS


async def wait_for_generation(store: PolicyStore, generation: int) -> None:
    for _ in range(500):
        if store.current.generation >= generation:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"generation {generation} never reached")


# --- reloads off the loop, one at a time -------------------------------------------------

GATE_TIMEOUT = 10.0
STEPS = 1000
"""Loop iterations (10 ms each) waited for a condition before failing."""


class GatedCompile:
    """Stands in for compile_policy: notes the thread, says it began, waits to be let through
    (a policy that takes as long as the test likes to compile)."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.began = threading.Event()
        self.release = threading.Event()

    def __call__(self, model: Model, settings: Settings) -> PolicyIndex:
        self.threads.append(threading.get_ident())
        self.began.set()
        if not self.release.wait(GATE_TIMEOUT):
            raise AssertionError("the compile was never let through")
        return compile_policy(model, settings)


def gate_compile(monkeypatch: pytest.MonkeyPatch) -> GatedCompile:
    """From now on (after the initial load) compiles pass through a gate."""
    gated = GatedCompile()
    monkeypatch.setattr(store_module, "compile_policy", gated)
    return gated


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(STEPS):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def test_reload_compiles_in_a_thread_not_the_loops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.yaml"
    write(path, "Allow")
    store, _ = make_store(path)
    gate = gate_compile(monkeypatch)
    gate.release.set()

    async def scenario() -> int:
        assert await store.reload(force=True) is True
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert len(gate.threads) == 1 and gate.threads[0] != loop_thread
    assert store.current.generation == 2


def test_admin_answers_while_a_reload_compiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop keeps serving during a reload; the new policy comes in whole when it is done."""
    path = tmp_path / "policy.yaml"
    write(path, "Allow")
    store, reported = make_store(path)
    gate = gate_compile(monkeypatch)
    write(path, "Deny")

    async def generation_served(port: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /config HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            response = await asyncio.wait_for(reader.read(), GATE_TIMEOUT)
        finally:
            writer.close()
        return int(json.loads(response.split(b"\r\n\r\n", 1)[1])["generation"])

    async def scenario() -> None:
        handlers = admin.base_handlers(admin.Health(), store, CollectorRegistry())
        server = await admin.start_admin(admin.bind_admin(Endpoint("127.0.0.1", 0)), handlers)
        port = server.sockets[0].getsockname()[1]
        reloading = asyncio.create_task(store.reload(force=False))
        try:
            await until(gate.began.is_set, "the reload began compiling")
            assert await generation_served(port) == 1
            assert not reloading.done() and action(store) == Action.PASS
            gate.release.set()
            assert await reloading is True
            assert await generation_served(port) == 2
        finally:
            gate.release.set()
            await reloading
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
    assert (action(store), reported) == (Action.DENY, [True])


def test_reloads_asked_for_during_a_reload_make_exactly_one_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.yaml"
    write(path, "Allow")
    store, reported = make_store(path)
    gate = gate_compile(monkeypatch)

    async def scenario() -> None:
        watcher = asyncio.create_task(store.watch(interval=3600))
        try:
            store.request_reload()
            await until(gate.began.is_set, "the first reload began compiling")
            write(path, "Deny")
            for _ in range(3):
                store.request_reload()
            gate.release.set()
            await until(lambda: store.current.generation == 3, "generation 3")
            await asyncio.sleep(0.2)  # room for a reload too many to show itself
        finally:
            gate.release.set()
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher

    asyncio.run(scenario())
    assert (store.current.generation, action(store)) == (3, Action.DENY)
    assert (len(gate.threads), reported) == (2, [True, True])


def test_a_worker_runs_each_policy_its_supervisor_reloads_and_never_reads_the_file(
    tmp_path: Path,
) -> None:
    """The pipe of --workers: a worker compiles the bytes the supervisor read, under the
    supervisor's generation, and stops following when the pipe closes."""
    path = tmp_path / "policy.yaml"
    write(path, "Allow")
    supervisor, _ = make_store(path)
    worker, _ = make_store(path)

    async def scenario() -> None:
        feed_read, feed_write = os.pipe()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(feed_write, "wb", buffering=0)
        )
        supervisor.feeds.append(transport)
        following = asyncio.create_task(worker.follow(feed_read))
        for policy in ("Deny", "Allow", "Deny"):
            write(path, policy)
            assert await supervisor.reload()
        path.write_text("kind: [\n")
        transport.close()
        await asyncio.wait_for(following, GATE_TIMEOUT)

    asyncio.run(scenario())
    assert (worker.current.generation, action(worker)) == (4, Action.DENY)


def test_a_worker_does_not_repeat_what_loading_the_policy_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The supervisor logs a policy's warnings when it loads it; its workers, compiling
    the same bytes, stay quiet."""
    path = tmp_path / "policy.yaml"
    write(path, "Allow")
    worker, _ = make_store(path)
    warned = POLICY.format(policy="Allow") + WARNS_AT_LOAD
    with caplog.at_level(logging.DEBUG, logger="egressproxy"):
        asyncio.run(worker.adopt(warned.encode(), 2))
    assert worker.current.generation == 2
    assert [record.name for record in caplog.records] == ["egressproxy.policy.store"]
    with caplog.at_level(logging.INFO, logger="egressproxy"):
        compile_policy(load_policy_text(warned, str(path)), Settings(policy_file=path))
    assert any(record.levelno == logging.WARNING for record in caplog.records)


class _Cycle:
    """Garbage only the cyclic collector frees."""

    def __init__(self) -> None:
        self.itself = self


def test_a_reloaded_policy_is_frozen_as_the_first_one_was(tmp_path: Path) -> None:
    """A serving process froze what start-up made, the policy with it, so full collections
    do not walk it; the index a reload brings is frozen too, and cyclic garbage frozen
    before is collected on the way rather than kept for good."""
    path = tmp_path / "policy.yaml"
    write(path, "Allow")
    store, _ = make_store(path)
    write(path, "Deny")
    assert reload(store) is True
    assert gc.get_freeze_count() == 0, "a process that froze nothing had its objects frozen"
    garbage = _Cycle()
    collected = weakref.ref(garbage)
    del garbage
    gc.freeze()
    try:
        write(path, "Allow")
        assert reload(store) is True
        index = store.current.index
        assert gc.get_freeze_count() > 0
        assert not any(tracked is index for tracked in gc.get_objects()), (
            "the reloaded index is walked by every full collection"
        )
        assert collected() is None, "garbage frozen before the reload was kept"
    finally:
        gc.unfreeze()
