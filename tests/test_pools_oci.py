"""Warm pools on the real oci backend (crun): a primed member's first command goes
through its standby shell with the same results as an ordinary exec (output, env,
cwd, stdin, exit status, missing command, timeout kill), and nothing is left."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.backends.oci import OciBackend
from corral.images import ImageStore
from corral.runtime.manager import SandboxManager
from corral.runtime.pools import PoolManager
from corral.store import Store

pytestmark = pytest.mark.runtime


@pytest.fixture
async def pools(state_root: Path, image_store: ImageStore) -> AsyncIterator[PoolManager]:
    store = Store.for_state_dir(state_root)
    manager = SandboxManager(OciBackend(state_root), store, image_store)
    pools = PoolManager(manager)
    await pools.add("oci", size=2, fill=True)
    yield pools
    await pools.remove("oci")
    for record in manager.list():
        await manager.destroy(record.id)
    await manager.backend.aclose()
    store.close()


def standbys(pools: PoolManager) -> dict[str, object]:
    backend = pools.manager.backend
    assert isinstance(backend, OciBackend)
    return backend._standbys  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("argv", "options", "expected"),
    [
        (["echo", "hi"], {}, (0, b"hi\n", b"")),
        (
            ["/bin/sh", "-c", 'echo "$A|$B"; pwd; cat; echo err >&2; exit 3'],
            {"env": {"A": "x y", "B": "it's"}, "cwd": "/tmp", "stdin": b"fed\n"},
            (3, b"x y|it's\n/tmp\nfed\n", b"err\n"),
        ),
        (["/bin/sh", "-c", "id -u; echo $HOME"], {}, (0, b"1000\n/home/sandbox\n", b"")),
    ],
)
async def test_first_exec_through_the_standby_matches_an_ordinary_exec(
    pools: PoolManager, argv: list[str], options: dict[str, object], expected: object
) -> None:
    claim = await pools.claim("oci")
    assert claim.from_pool
    assert claim.record.id in standbys(pools)
    first = await pools.manager.exec(claim.record.id, argv, **options)
    assert claim.record.id not in standbys(pools), "the standby served the first command"
    second = await pools.manager.exec(claim.record.id, argv, **options)  # ordinary exec
    for result in (first, second):
        assert (result.exit_code, result.stdout, result.stderr) == expected


async def test_standby_missing_command_and_timeout(pools: PoolManager) -> None:
    claim = await pools.claim("oci")
    missing = await pools.manager.exec(claim.record.id, ["no-such-command"])
    assert missing.exit_code == 127
    assert missing.reason == "command not found: no-such-command"
    claim = await pools.claim("oci")
    slow = await pools.manager.exec(
        claim.record.id, ["/bin/sh", "-c", "sleep 30 & sleep 30"], timeout=0.5
    )
    assert slow.timed_out
    assert slow.exit_code == 124
    # Killed at the timeout: gone once the sandbox's init has reaped them (which it
    # does on its own time, so a busy host may still count them right after).
    deadline = time.monotonic() + 5
    while (await pools.manager.stats(claim.record.id)).pids > 1:
        assert time.monotonic() < deadline, "the timeout left the command or its child running"
        await asyncio.sleep(0.05)


async def test_destroying_a_primed_member_releases_its_standby(pools: PoolManager) -> None:
    members = pools.store.pools.members("local", "oci")
    assert {m.id for m in members} <= set(standbys(pools))
    await pools.remove("oci")
    assert standbys(pools) == {}
    await pools.add("oci", size=0)
