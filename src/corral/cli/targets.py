"""Where the sandbox commands act: this host's runtime in-process, or a Corral server.

Both give the same answers (the API's `Sandbox` and `Inspection` models), so every
command prints the same thing whichever context it runs in.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.errors import UserError

if TYPE_CHECKING:
    from corral.api.models import Inspection, Sandbox
    from corral.backends.base import ExecEvent
    from corral.client import AsyncCorral
    from corral.runtime.manager import SandboxManager


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

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass


class LocalTarget(Target):
    """This host's runtime, in this process."""

    name = "local"

    def __init__(self, manager: SandboxManager, runtime: str | None) -> None:
        self.manager = manager
        self.runtime = runtime

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
        if Path(template).suffix == ".toml" or "/" in template:
            template_ref: str | Path = Path(template)
        else:
            template_ref = template
        sandbox = await self.client.create(template_ref, **fields)
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

    async def aclose(self) -> None:
        await self.client.aclose()
