"""CLI contexts: named Corral servers (URL and API key), like docker or kubectl contexts.

Kept in `$CORRAL_CONTEXTS` (default `~/.config/corral/contexts.json`, mode 0600, as
it holds keys). The built-in context `local` runs sandboxes in this process, on
this host. Which context a command uses: `--context`, else `$CORRAL_CONTEXT`,
else the one chosen with `corral context use`, else `local`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.errors import ConflictError, NotFoundError, UserError

LOCAL = "local"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True, slots=True)
class Context:
    name: str
    url: str | None = None  # None: the local in-process runtime
    token: str | None = None

    @property
    def remote(self) -> bool:
        return self.url is not None


def contexts_file(environ: Mapping[str, str]) -> Path:
    if environ.get("CORRAL_CONTEXTS"):
        return Path(environ["CORRAL_CONTEXTS"])
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")) / ".config")
    return Path(base).expanduser() / "corral" / "contexts.json"


class ContextStore:
    """Read and change the contexts file (written atomically, never world-readable)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        self.path = contexts_file(self.environ)

    def _load(self) -> tuple[str, dict[str, Context]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return LOCAL, {}
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{self.path}: cannot be read ({exc})",
                hint="fix or remove the file, then add contexts again",
            ) from None
        contexts = {
            name: Context(name, item.get("url"), item.get("token"))
            for name, item in data.get("contexts", {}).items()
        }
        return str(data.get("current", LOCAL)), contexts

    def _save(self, current: str, contexts: dict[str, Context]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "current": current,
            "contexts": {
                name: {k: v for k, v in asdict(c).items() if k != "name" and v is not None}
                for name, c in sorted(contexts.items())
            },
        }
        partial = self.path.with_suffix(".tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2)
            f.write("\n")
        os.replace(partial, self.path)

    def list(self) -> tuple[str, list[Context]]:
        current, contexts = self._load()
        return current, [Context(LOCAL), *contexts.values()]

    def add(self, name: str, url: str, token: str | None, *, replace: bool = False) -> Context:
        if name == LOCAL or not _NAME.fullmatch(name):
            raise UserError(
                f"'{name}' cannot name a context",
                hint="use letters, digits, '.', '_', '-' ('local' is built in)",
            )
        if not url.startswith(("http://", "https://", "unix:")):
            raise UserError(f"'{url}' is not a server URL", hint="e.g. https://corral.example:7070")
        current, contexts = self._load()
        if name in contexts and not replace:
            raise ConflictError(
                f"context '{name}' already exists", hint="pass --replace to change it"
            )
        contexts[name] = Context(name, url.rstrip("/"), token)
        self._save(current, contexts)
        return contexts[name]

    def use(self, name: str) -> None:
        _previous, contexts = self._load()
        if name != LOCAL and name not in contexts:
            raise self._unknown(name)
        self._save(name, contexts)

    def remove(self, name: str) -> None:
        current, contexts = self._load()
        if name not in contexts:
            raise self._unknown(name)
        del contexts[name]
        self._save(LOCAL if current == name else current, contexts)

    def resolve(self, flag: str | None = None) -> Context:
        """The context a command runs in (see the module docstring)."""
        current, contexts = self._load()
        name = flag or self.environ.get("CORRAL_CONTEXT") or current
        if name == LOCAL:
            return Context(LOCAL)
        if name not in contexts:
            raise self._unknown(name)
        return contexts[name]

    def _unknown(self, name: str) -> NotFoundError:
        return NotFoundError(
            f"no context '{name}'",
            hint="list them with `corral context ls`; add one with `corral context add`",
        )
