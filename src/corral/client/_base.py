"""What the sync and async SDK clients share, with no I/O.

The connection (URL and API key, from arguments or the environment), every API
call as data (method, path, params, body), and the reading of answers into
typed results or Corral exceptions. `sync.py` and `aio.py` only send and receive.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypedDict, TypeVar
from urllib.parse import quote, unquote

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from corral import __version__
from corral.api import models
from corral.api.problems import PROBLEM_MEDIA_TYPE
from corral.backends.base import SandboxStats
from corral.client._events import argv_list, is_problem, problem_error, stdin_base64
from corral.errors import (
    AuthenticationError,
    ConflictError,
    CorralError,
    FileTooLargeError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    ServerUnavailableError,
    TemplateError,
    UserError,
)

ENV_URL = "CORRAL_URL"
ENV_API_KEY = "CORRAL_API_KEY"
DEFAULT_TIMEOUT = 60.0
# Creating may realize the template first; an mmdebstrap image build takes minutes.
CREATE_TIMEOUT = 900.0
# Read time allowed past an exec's own timeout, for the server to kill it and report.
EXEC_TIMEOUT_MARGIN = 60.0
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


class SandboxOptions(TypedDict, total=False):
    """The optional fields of a new sandbox (see `corral.api.models.SandboxCreate`)."""

    runtime: str
    memory: str | int
    cpus: float
    pids: int
    disk: str | int
    cpuset: str
    timeout: float
    env: Mapping[str, str]
    labels: Mapping[str, str]
    metadata: Mapping[str, Any]
    name: str


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the server is and which key to present, resolved once per client."""

    base_url: str  # scheme://host[:port][/prefix], without the /v1
    api_key: str | None
    uds: str | None = None  # a unix socket; base_url is then http://localhost

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
        return cls(base.removesuffix(models.API_PREFIX), api_key)

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

    def headers(self) -> dict[str, str] | None:
        return {"Content-Type": self.content_type} if self.content_type else None


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

    @property
    def url(self) -> str:
        """The server this client talks to."""
        return self._connection.display

    def _timeout_for(self, call: Call) -> httpx.Timeout:
        read = self._timeout if call.read_timeout == "client" else call.read_timeout
        return httpx.Timeout(self._timeout, read=read)

    def _transport_errors(self, call: Call) -> TransportErrors:
        return TransportErrors(self._connection, call)

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


def _sandbox_path(sandbox_id: str, tail: str = "") -> str:
    return f"{models.API_PREFIX}/sandboxes/{quote(sandbox_id, safe='')}{tail}"


def _validated(model: type[ModelT], fields: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The JSON body for `fields`, checked against the wire model before it is sent."""
    try:
        body = model.model_validate(dict(fields))
    except ValidationError as exc:
        issues = "; ".join(
            f"{'.'.join(str(p) for p in issue['loc']) or 'body'}: {issue['msg']}"
            for issue in exc.errors()[:5]
        )
        raise UserError(f"invalid {what}: {issues}") from None
    return body.model_dump(mode="json", exclude_unset=True)


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise UserError(
            f"'{path}' is not an absolute path", hint="paths inside a sandbox start with '/'"
        )
    return path


def health_call() -> Call:
    return Call("GET", f"{models.API_PREFIX}/health")


def ready_call() -> Call:
    return Call("GET", f"{models.API_PREFIX}/ready")


def templates_call() -> Call:
    return Call("GET", f"{models.API_PREFIX}/templates")


def tenant_call() -> Call:
    return Call("GET", f"{models.API_PREFIX}/tenants/me")


def tenants_call() -> Call:
    return Call("GET", f"{models.API_PREFIX}/tenants")


def create_call(template: str | os.PathLike[str], options: SandboxOptions) -> Call:
    """A named template is sent by name; a local .toml file is read and sent whole."""
    fields: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    if isinstance(template, os.PathLike) or template.endswith(".toml") or "/" in template:
        fields["template_spec"] = read_template_file(Path(template))
        fields["template"] = str(fields["template_spec"].get("name") or Path(template).stem)
    else:
        fields["template"] = template
    body = _validated(models.SandboxCreate, fields, "sandbox settings")
    return Call(
        "POST",
        f"{models.API_PREFIX}/sandboxes",
        json=body,
        read_timeout=CREATE_TIMEOUT,
    )


def read_template_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise NotFoundError(
            f"template file '{path}' does not exist",
            hint="check the path, or name a template the server knows (Corral.templates())",
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TemplateError(
            f"cannot read it: {exc}", file=str(path), hint="fix the TOML syntax"
        ) from None


def list_call(state: str | None, labels: Mapping[str, str] | None, tenant: str | None) -> Call:
    params: list[tuple[str, str]] = []
    if state is not None:
        params.append(("state", state))
    params.extend(("label", f"{key}={value}") for key, value in (labels or {}).items())
    if tenant is not None:
        params.append(("tenant", tenant))
    return Call("GET", f"{models.API_PREFIX}/sandboxes", params=tuple(params))


def get_call(sandbox_id: str) -> Call:
    return Call("GET", _sandbox_path(sandbox_id), sandbox_id=sandbox_id)


def destroy_call(sandbox_id: str) -> Call:
    return Call("DELETE", _sandbox_path(sandbox_id), sandbox_id=sandbox_id)


def patch_call(
    sandbox_id: str,
    labels: Mapping[str, str | None] | None,
    metadata: Mapping[str, Any] | None,
) -> Call:
    fields: dict[str, Any] = {}
    if labels is not None:
        fields["labels"] = dict(labels)
    if metadata is not None:
        fields["metadata"] = dict(metadata)
    body = _validated(models.SandboxPatch, fields, "labels or metadata")
    return Call("PATCH", _sandbox_path(sandbox_id), json=body, sandbox_id=sandbox_id)


def timeout_call(sandbox_id: str, seconds: float) -> Call:
    body = _validated(models.TimeoutUpdate, {"seconds": seconds}, "timeout")
    return Call("PUT", _sandbox_path(sandbox_id, "/timeout"), json=body, sandbox_id=sandbox_id)


def pause_call(sandbox_id: str) -> Call:
    return Call("POST", _sandbox_path(sandbox_id, "/pause"), sandbox_id=sandbox_id)


def resume_call(sandbox_id: str) -> Call:
    return Call("POST", _sandbox_path(sandbox_id, "/resume"), sandbox_id=sandbox_id)


def stats_call(sandbox_id: str) -> Call:
    return Call("GET", _sandbox_path(sandbox_id, "/stats"), sandbox_id=sandbox_id)


def exec_body(
    argv: str | Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bytes | str | None,
    timeout: float | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {"argv": argv_list(argv)}
    if env:
        fields["env"] = dict(env)
    if cwd is not None:
        fields["cwd"] = cwd
    if stdin is not None:
        fields["stdin"] = stdin_base64(stdin)
    if timeout is not None:
        fields["timeout"] = timeout
    return _validated(models.ExecBody, fields, "command")


def exec_call(
    sandbox_id: str,
    argv: str | Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bytes | str | None,
    timeout: float | None,
) -> Call:
    return Call(
        "POST",
        _sandbox_path(sandbox_id, "/exec"),
        json=exec_body(argv, env, cwd, stdin, timeout),
        # Without a timeout a command may stay silent for as long as it likes.
        read_timeout=None if timeout is None else timeout + EXEC_TIMEOUT_MARGIN,
        sandbox_id=sandbox_id,
    )


def exec_ws_path(sandbox_id: str) -> str:
    return _sandbox_path(sandbox_id, "/exec/ws")


def write_file_call(sandbox_id: str, path: str, data: bytes | str, mode: int) -> Call:
    if not 0 <= mode <= 0o7777:
        raise UserError(f"mode {mode:#o} is not a file mode", hint="use e.g. 0o644 or 0o755")
    return Call(
        "PUT",
        _sandbox_path(sandbox_id, "/files"),
        params=(("path", _absolute(path)), ("mode", format(mode, "o"))),
        content=data.encode() if isinstance(data, str) else bytes(data),
        content_type="application/octet-stream",
        sandbox_id=sandbox_id,
    )


def read_file_call(sandbox_id: str, path: str) -> Call:
    return Call(
        "GET",
        _sandbox_path(sandbox_id, "/files"),
        params=(("path", _absolute(path)),),
        sandbox_id=sandbox_id,
    )


def put_archive_call(sandbox_id: str, path: str, tar: bytes) -> Call:
    return Call(
        "PUT",
        _sandbox_path(sandbox_id, "/archive"),
        params=(("path", _absolute(path)),),
        content=tar,
        content_type=models.TAR_MEDIA_TYPE,
        sandbox_id=sandbox_id,
    )


def get_archive_call(sandbox_id: str, path: str) -> Call:
    return Call(
        "GET",
        _sandbox_path(sandbox_id, "/archive"),
        params=(("path", _absolute(path)),),
        sandbox_id=sandbox_id,
    )
