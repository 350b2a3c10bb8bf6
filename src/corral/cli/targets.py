"""Where the sandbox commands act: this host's runtime in-process, or a Corral server.

Both give the same answers (the API's `Sandbox` and `Inspection` models), so every
command prints the same thing whichever context it runs in.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError, UserError

if TYPE_CHECKING:
    from corral.api.models import ClaimResult, Inspection, PoolInfo, Sandbox
    from corral.backends.base import ExecEvent
    from corral.client import AsyncCorral
    from corral.runtime.manager import SandboxManager
    from corral.runtime.pools import PoolManager


class Target(abc.ABC):
    """The verbs the sandbox commands need."""

    name: str

    @abc.abstractmethod
    async def create(self, template: str, **options: Any) -> Sandbox: ...

    @abc.abstractmethod
    def exec_stream(
        self,
        sandbox: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        stdin: bytes | None,
        timeout: float | None,
    ) -> AsyncIterator[ExecEvent]: ...

    @abc.abstractmethod
    async def put_file(self, sandbox: str, path: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def get_file(self, sandbox: str, path: str) -> bytes: ...

    @abc.abstractmethod
    async def list(
        self, *, state: str | None, labels: Mapping[str, str]
    ) -> builtins.list[Sandbox]: ...

    @abc.abstractmethod
    async def inspect(self, sandbox: str) -> Inspection: ...

    @abc.abstractmethod
    async def destroy(self, sandbox: str) -> None: ...

    async def gc(self) -> dict[str, builtins.list[str]]:
        raise UserError(
            f"gc runs where the sandboxes are, not through context '{self.name}'",
            hint="the server reaps and reconciles by itself; run `corral gc` on its host",
        )

    # Warm pools (`corral pool ...`, `create/run --from-pool`).
    @abc.abstractmethod
    async def claim(self, pool: str, **options: Any) -> ClaimResult: ...

    @abc.abstractmethod
    async def add_pool(self, name: str, template: str, size: int, **options: Any) -> PoolInfo: ...

    @abc.abstractmethod
    async def list_pools(self) -> builtins.list[PoolInfo]: ...

    @abc.abstractmethod
    async def remove_pool(self, name: str) -> builtins.list[str]: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass


class LocalTarget(Target):
    """This host's runtime, in this process."""

    name = "local"

    def __init__(self, manager: SandboxManager, runtime: str | None) -> None:
        self.manager = manager
        self.runtime = runtime
        self._claimed: set[str] = set()  # pools to refill before the command ends

    @property
    def pools(self) -> PoolManager:
        from corral.runtime.pools import PoolManager

        return PoolManager(self.manager)

    async def claim(self, pool: str, **options: Any) -> ClaimResult:
        from corral.api.models import ClaimResult, Sandbox

        claim = await self.pools.claim(pool, **options)
        self._claimed.add(pool)
        return ClaimResult(
            sandbox=Sandbox.from_record(claim.record),
            pool=pool,
            from_pool=claim.from_pool,
            seconds=claim.seconds,
        )

    async def add_pool(self, name: str, template: str, size: int, **options: Any) -> PoolInfo:
        from corral.api.models import PoolInfo

        pools = self.pools
        options.setdefault("runtime", self.runtime)
        # No server refills here: the members are made now.
        await pools.add(name, template, size=size, fill=True, **options)
        return PoolInfo.from_status(pools.get(name))

    async def list_pools(self) -> builtins.list[PoolInfo]:
        from corral.api.models import PoolInfo

        return [PoolInfo.from_status(status) for status in self.pools.list()]

    async def remove_pool(self, name: str) -> builtins.list[str]:
        return await self.pools.remove(name)

    async def aclose(self) -> None:
        # A claim took a member: replace it, as the server's refill loop would.
        pools = self.pools
        for name in sorted(self._claimed):
            with contextlib.suppress(CorralError):
                status = pools.get(name)
                await pools.refill_pool(status.pool, pools.store.pools.members("local", name))
        self._claimed.clear()

    async def create(self, template: str, **options: Any) -> Sandbox:
        from corral.api.models import Sandbox

        record = await self.manager.create(template, runtime=self.runtime, **options)
        return Sandbox.from_record(record)

    async def exec_stream(
        self,
        sandbox: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        stdin: bytes | None,
        timeout: float | None,
    ) -> AsyncGenerator[ExecEvent]:
        events = self.manager.exec_stream(
            sandbox, argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout
        )
        async for event in events:
            yield event

    async def put_file(self, sandbox: str, path: str, data: bytes) -> None:
        await self.manager.put_file(sandbox, path, data)

    async def get_file(self, sandbox: str, path: str) -> bytes:
        return await self.manager.get_file(sandbox, path)

    async def list(self, *, state: str | None, labels: Mapping[str, str]) -> builtins.list[Sandbox]:
        from corral.api.models import Sandbox

        records = self.manager.list(states=(state,) if state else None, labels=labels)
        return [Sandbox.from_record(r) for r in records]

    async def inspect(self, sandbox: str) -> Inspection:
        return await self.manager.inspect(sandbox)

    async def destroy(self, sandbox: str) -> None:
        await self.manager.destroy(sandbox)

    async def gc(self) -> dict[str, builtins.list[str]]:
        return await self.manager.gc()


class RemoteTarget(Target):
    """A Corral server, through the SDK."""

    def __init__(self, name: str, client: AsyncCorral, runtime: str | None) -> None:
        self.name = name
        self.client = client
        self.runtime = runtime

    async def create(self, template: str, **options: Any) -> Sandbox:
        options.pop("progress", None)
        if self.runtime is not None:
            options["runtime"] = self.runtime
        fields = {k: v for k, v in options.items() if v is not None}
        # The SDK tells a template name from a local .toml file (sent whole).
        sandbox = await self.client.create(template, **fields)
        return sandbox.info

    async def exec_stream(
        self,
        sandbox: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        stdin: bytes | None,
        timeout: float | None,
    ) -> AsyncGenerator[ExecEvent]:
        handle = await self.client.get(sandbox)
        stream = handle.exec_stream(
            list(argv), env=dict(env), cwd=cwd, stdin=stdin, timeout=timeout
        )
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    async def run_stream(
        self,
        template: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        timeout: float | None,
        **options: Any,
    ) -> AsyncGenerator[ExecEvent]:
        """Create, exec and destroy in one request (the server destroys the sandbox
        even if this process dies mid-way)."""
        if self.runtime is not None:
            options["runtime"] = self.runtime
        fields = {k: v for k, v in options.items() if v is not None}
        stream = self.client.run_stream(
            list(argv), template, env=dict(env), cwd=cwd, timeout=timeout, **fields
        )
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    async def put_file(self, sandbox: str, path: str, data: bytes) -> None:
        await (await self.client.get(sandbox)).files.write(path, data)

    async def get_file(self, sandbox: str, path: str) -> bytes:
        return await (await self.client.get(sandbox)).files.read(path)

    async def list(self, *, state: str | None, labels: Mapping[str, str]) -> builtins.list[Sandbox]:
        return [s.info for s in await self.client.list(state=state, labels=labels)]

    async def inspect(self, sandbox: str) -> Inspection:
        return await (await self.client.get(sandbox)).inspect()

    async def destroy(self, sandbox: str) -> None:
        await (await self.client.get(sandbox)).kill()

    async def claim(self, pool: str, **options: Any) -> ClaimResult:
        from corral.api.models import ClaimResult

        fields = {k: v for k, v in options.items() if v is not None}
        sandbox = await self.client.claim(pool, **fields)
        assert sandbox.from_pool is not None
        return ClaimResult(sandbox=sandbox.info, pool=pool, from_pool=sandbox.from_pool, seconds=0)

    async def add_pool(self, name: str, template: str, size: int, **options: Any) -> PoolInfo:
        if self.runtime is not None:
            options.setdefault("runtime", self.runtime)
        fields = {k: v for k, v in options.items() if v is not None}
        return await self.client.create_pool(name, template, size=size, **fields)

    async def list_pools(self) -> builtins.list[PoolInfo]:
        return await self.client.pools()

    async def remove_pool(self, name: str) -> builtins.list[str]:
        return await self.client.delete_pool(name)

    async def aclose(self) -> None:
        await self.client.aclose()
