"""Hot reload: generation +1 per change, unchanged content a no-op, a broken file keeps the old."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from pathlib import Path

import pytest

from egressproxy.policy.decision import Action, ConnectionFacts, Destination, Detected
from egressproxy.policy.errors import PolicyError
from egressproxy.policy.store import PolicyStore
from egressproxy.settings import Settings

POLICY = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {{namespace: linkerd-egress, name: all}}
spec:
  trafficPolicy: {policy}
"""
FACTS = ConnectionFacts(Destination(ipaddress.ip_address("203.0.113.1"), 22), Detected.OPAQUE, None)


def write(path: Path, policy: str) -> None:
    path.write_text(POLICY.format(policy=policy))


def action(store: PolicyStore) -> Action:
    return store.current.index.decide_connection(FACTS).action


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
    assert store.reload(force=False) is False
    assert store.current is first and reported == []
    write(path, "Deny")
    assert store.reload(force=False) is True
    assert (store.current.generation, action(store), reported) == (2, Action.DENY, [True])
    assert store.reload(force=False) is False
    assert store.reload(force=True) is True
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
        assert store.reload(force=False) is False
        assert store.reload(force=False) is False
    assert (store.current.generation, action(store), reported) == (1, Action.PASS, [False])
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}:5: EgressNetwork linkerd-egress/all.spec.trafficPolicy: "
        "'Sometimes' is not one of Allow, Deny"
    ]
    path.unlink()
    assert store.reload(force=True) is False
    assert reported == [False, False]
    write(path, "Deny")
    assert store.reload(force=False) is True
    assert store.current.generation == 2


def test_an_unreadable_file_on_reload_is_named_without_a_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    write(path, "Deny")
    store, reported = make_store(path)
    path.unlink()
    with caplog.at_level(logging.ERROR, logger="egressproxy.policy.store"):
        assert store.reload(force=True) is False
        path.mkdir()
        assert store.reload(force=True) is False
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
    assert renamed.reload(force=False) is True
    assert action(renamed) == Action.PASS


async def wait_for_generation(store: PolicyStore, generation: int) -> None:
    for _ in range(500):
        if store.current.generation >= generation:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"generation {generation} never reached")
