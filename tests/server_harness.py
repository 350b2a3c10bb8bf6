"""A real `corral serve` on a loopback port, for tests and benchmarks.

Started as its own process (as operators run it), ready when /v1/ready says so
within a deadline; its log is kept for failure messages; stopped terminate ->
wait -> kill, or killed with SIGKILL on purpose (crash tests).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from corral.store import Quota, Store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    def __init__(
        self,
        state_dir: Path,
        *,
        backend: str = "oci",
        database_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        config: str = "",
    ) -> None:
        self.state_dir = state_dir
        self.backend = backend
        self.database_url = database_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = state_dir / "server.log"
        self.config_path = state_dir / "config.toml"
        self.config_path.write_text(config)
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.database_url, self.state_dir)
        return self._store

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "CORRAL_STATE_DIR": str(self.state_dir),
            "CORRAL_BACKEND": self.backend,
            "CORRAL_CONFIG": str(self.config_path),
            "CORRAL_CLI_SERVER": "0",
            **self.extra_env,
        }
        if self.database_url:
            env["CORRAL_DATABASE_URL"] = self.database_url
        return env

    def start(self, timeout: float = 60.0) -> None:
        corral = str(Path(sys.executable).with_name("corral"))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [corral, "serve", "--listen", f"127.0.0.1:{self.port}", "--log-level", "info"],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"corral serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/v1/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"corral serve not ready after {timeout}s:\n{self.log()}")

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill9(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None

    def tenant(self, name: str, quota: Quota | None = None, *, admin: bool = False) -> str:
        """Make tenant `name` (if new) and return a fresh API key for it."""
        tenants = self.store.tenants
        if tenants.find(name) is None:
            tenants.add(name, quota or Quota())
        return tenants.create_key(name, admin=admin)

    def close(self) -> None:
        self.stop()
        if self._store is not None:
            self._store.close()
            self._store = None
