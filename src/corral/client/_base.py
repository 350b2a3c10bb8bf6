"""What the sync and async SDK clients share, with no I/O.

The connection (URL and API key, from arguments or the environment), a call as
data (built in `_calls`), and the reading of answers into typed results or
Corral exceptions. `sync.py` and `aio.py` only send and receive.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlencode

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from corral import __version__
from corral.api import models
from corral.api.problems import PROBLEM_MEDIA_TYPE
from corral.backends.base import SandboxStats
from corral.client._events import is_problem, problem_error
from corral.errors import (
    AuthenticationError,
    ConflictError,
    CorralError,
    FileTooLargeError,
    InvalidStateError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    ServerUnavailableError,
    UserError,
)

ENV_URL = "CORRAL_URL"
ENV_API_KEY = "CORRAL_API_KEY"
DEFAULT_TIMEOUT = 60.0
USER_AGENT = "corral-python"

ModelT = TypeVar("ModelT", bound=BaseModel)
# Answers that are not problem bodies still map to the matching class.
_PLAIN_STATUS_ERRORS: dict[int, type[UserError]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: FileTooLargeError,
    429: QuotaExceededError,
}


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the server is and which key to present, resolved once per client."""

    base_url: str  # scheme://host[:port][/prefix], without the /v1
    api_key: str | None
    uds: str | None = None  # a unix socket; base_url is then http://localhost
    proxy: str | None = None  # from HTTP(S)_PROXY / ALL_PROXY unless NO_PROXY exempts it

    @classmethod
    def resolve(
        cls, url: str | None, api_key: str | None, environ: Mapping[str, str]
    ) -> Connection:
        """From the arguments, else CORRAL_URL / CORRAL_API_KEY in `environ`."""
        url = url or environ.get(ENV_URL) or None
        if url is None:
            raise UserError(
                "no Corral server to talk to",
                hint=f"pass url= (e.g. Corral('http://127.0.0.1:8080')) or set {ENV_URL}",
            )
        api_key = api_key or environ.get(ENV_API_KEY) or None
        for prefix in ("unix://", "unix:", "http+unix://"):
            if url.startswith(prefix):
                path = unquote(url.removeprefix(prefix))
                if not path.startswith("/"):
                    path = "/" + path
                return cls("http://localhost", api_key, uds=path)
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise UserError(f"'{url}' is not a URL: {exc}", hint=_URL_HINT) from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise UserError(f"'{url}' is not an http(s) URL", hint=_URL_HINT)
        base = str(parsed.copy_with(query=None, fragment=None)).rstrip("/")
        proxy = environment_proxy(parsed.scheme, parsed.host, environ)
        return cls(base.removesuffix(models.API_PREFIX), api_key, proxy=proxy)

    @property
    def display(self) -> str:
        return f"unix:{self.uds}" if self.uds else self.base_url

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"{USER_AGENT}/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def ws_url(self, path: str) -> str:
        scheme, rest = self.base_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"


def environment_proxy(scheme: str, host: str, environ: Mapping[str, str]) -> str | None:
    """The proxy the environment names for `scheme`://`host`, as curl and httpx read it:
    `<scheme>_proxy` or `all_proxy` (either case), unless `no_proxy` lists the host,
    one of its parent domains, or `*`."""
    found = {k.lower(): v for k, v in environ.items() if k.lower().endswith("_proxy") and v}
    proxy = found.get(f"{scheme}_proxy") or found.get("all_proxy")
    if proxy is None:
        return None
    host = host.lower()
    for entry in found.get("no_proxy", "").split(","):
        entry = entry.strip().lower().lstrip(".")
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    return proxy


_URL_HINT = f"use http://HOST:PORT, https://..., or unix:/path/to.sock (argument url= or {ENV_URL})"


@dataclass(frozen=True, slots=True)
class Call:
    """One API request as data; the clients send it."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    json: dict[str, Any] | None = None
    content: bytes | None = None
    content_type: str | None = None
    # Seconds to wait for each read; None waits as long as it takes.
    read_timeout: float | Literal["client"] | None = "client"
    sandbox_id: str | None = None


class TransportErrors:
    """Turns httpx's transport failures into ServerUnavailableError (`with` in both twins)."""

    def __init__(self, connection: Connection, call: Call) -> None:
        self._connection = connection
        self._call = call

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not isinstance(exc, httpx.HTTPError | httpx.StreamError):
            return
        where = f"{self._call.method} {self._connection.display}{self._call.path}"
        if isinstance(exc, httpx.TimeoutException):
            message = f"{where}: the Corral server did not answer in time ({type(exc).__name__})"
        else:
            message = f"{where}: cannot reach the Corral server: {exc or type(exc).__name__}"
        raise ServerUnavailableError(
            message,
            sandbox_id=self._call.sandbox_id,
            hint=f"check that `corral serve` runs there and that {ENV_URL} (or url=) points at it",
        ) from exc


class BaseClient:
    """Connection settings and answer checking shared by `Corral` and `AsyncCorral`."""

    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        *,
        timeout: float,
        environ: Mapping[str, str] | None,
    ) -> None:
        self._connection = Connection.resolve(
            url, api_key, os.environ if environ is None else environ
        )
        self._timeout = timeout
        self._headers = self._connection.headers()
        self._is_closed = False

    @property
    def url(self) -> str:
        """The server this client talks to."""
        return self._connection.display

    def _timeout_for(self, call: Call) -> dict[str, float | None]:
        """The request's timeouts, as httpx transports read them from its extensions."""
        read = self._timeout if call.read_timeout == "client" else call.read_timeout
        each = self._timeout
        return {"connect": each, "read": read, "write": each, "pool": each}

    def _request(self, call: Call) -> httpx.Request:
        """`call` as a request for the transport. The clients hand it to their httpx
        transport themselves: httpx.Client's per-request work (joining the URL to a
        base, cookies, redirects, auth hooks) is nothing the API uses, and cost
        ~0.2 ms of CPU a request."""
        if self._is_closed:
            raise self._closed(call)
        url = self._connection.base_url + call.path
        if call.params:
            url += "?" + urlencode(call.params)
        headers = self._headers
        content = call.content
        if call.json is not None:
            content = json.dumps(
                call.json, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
            headers = headers | {"Content-Type": "application/json"}
        elif call.content_type:
            headers = headers | {"Content-Type": call.content_type}
        return httpx.Request(
            call.method,
            url,
            headers=headers,
            content=content,
            extensions={"timeout": self._timeout_for(call)},
        )

    def _transport_errors(self, call: Call) -> TransportErrors:
        return TransportErrors(self._connection, call)

    def _closed(self, call: Call) -> InvalidStateError:
        return InvalidStateError(
            f"{call.method} {call.path}: this client is closed",
            sandbox_id=call.sandbox_id,
            hint="use the client inside its `with` block, or make a new one",
        )

    def _check(self, call: Call, response: httpx.Response) -> None:
        """Raise the Corral exception an error answer stands for (its body already read)."""
        if response.is_success:
            return
        raise error_for(call, response, self._connection)


def error_for(call: Call, response: httpx.Response, connection: Connection) -> CorralError:
    """The Corral exception an error answer stands for."""
    return with_key_hint(_error_for_answer(call, response, connection), connection)


def with_key_hint(error: CorralError, connection: Connection) -> CorralError:
    """An authentication failure without a key configured says how to configure one."""
    if isinstance(error, AuthenticationError) and not connection.api_key:
        error.hint = f"no API key was sent: pass api_key= or set {ENV_API_KEY}"
    return error


def _error_for_answer(call: Call, response: httpx.Response, connection: Connection) -> CorralError:
    try:
        body = response.json()
    except ValueError:
        body = None
    content_type = response.headers.get("content-type", "")
    if is_problem(body) or (content_type.startswith(PROBLEM_MEDIA_TYPE) and isinstance(body, dict)):
        body.setdefault("status", response.status_code)
        return problem_error(body, sandbox_id=call.sandbox_id)
    where = f"{call.method} {connection.display}{call.path}"
    snippet = response.text[:200].strip()
    if response.status_code >= 500:
        return ServerUnavailableError(
            f"{where} answered HTTP {response.status_code}: {snippet}",
            sandbox_id=call.sandbox_id,
            hint="a proxy or a server outside Corral's API answered; check the server's log",
        )
    cls = _PLAIN_STATUS_ERRORS.get(response.status_code, UserError)
    return cls(
        f"{where} answered HTTP {response.status_code}: {snippet}",
        sandbox_id=call.sandbox_id,
        hint=f"is {connection.display} a Corral server? Its API lives under {models.API_PREFIX}",
    )


def _outside_api(call: Call, exc: Exception) -> ServerUnavailableError:
    return ServerUnavailableError(
        f"{call.method} {call.path}: the answer does not fit the API: {exc}",
        sandbox_id=call.sandbox_id,
        hint="the server may run a different Corral version; upgrade the client or the server",
    )


def parse(call: Call, response: httpx.Response, model: type[ModelT]) -> ModelT:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise _outside_api(call, exc) from None


def parse_list(call: Call, response: httpx.Response, model: type[ModelT]) -> list[ModelT]:
    try:
        return TypeAdapter(list[model]).validate_json(response.content)  # type: ignore[valid-type]
    except ValidationError as exc:
        raise _outside_api(call, exc) from None


def parse_stats(call: Call, response: httpx.Response) -> SandboxStats:
    stats = parse(call, response, models.Stats)
    return SandboxStats(**stats.model_dump())


# What is read after an exec's exit event to finish its response (normally nothing:
# the server ends the body there); past this the connection is dropped instead.
_DRAIN_LIMIT = 64 << 10


def drain(chunks: Iterator[bytes]) -> None:
    """Read and ignore the rest of a response body, up to _DRAIN_LIMIT bytes."""
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > _DRAIN_LIMIT:
            return


async def adrain(chunks: AsyncIterator[bytes]) -> None:
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > _DRAIN_LIMIT:
            return
