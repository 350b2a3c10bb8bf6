"""A throwaway PostgreSQL server for the store tests: its own cluster in a temp dir,
listening only on a unix socket there (no TCP), fsync off, removed afterwards."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: run `bash scripts/setup` (apt-get install postgresql)"
        )
    return Path(found[-1]).parent


class PostgresServer:
    def __init__(self, root: Path, user: str = "postgres") -> None:
        self.root = root
        self.user = user
        self.data = root / "data"
        self.bindir = pg_bindir()

    def _as_user(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if os.geteuid() == 0:  # the server refuses to run as root
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    def start(self) -> None:
        shutil.chown(self.root, self.user)
        for step in (
            ("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"),
            (
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.root / "server.log"),
                "-o",
                f"-c listen_addresses='' -k {self.root} -c fsync=off -c max_connections=200",
                "-w",
                "-t",
                "60",
                "start",
            ),
        ):
            result = self._as_user(*step)
            if result.returncode != 0:
                log = (self.root / "server.log").read_text() if step[0] == "pg_ctl" else ""
                raise RuntimeError(f"{step[0]} failed: {result.stderr}{result.stdout}\n{log}")

    def create_database(self, name: str) -> str:
        """A new empty database; its SQLAlchemy URL (psycopg over the unix socket)."""
        result = self._as_user("createdb", "-h", str(self.root), "-U", "postgres", name)
        if result.returncode != 0:
            raise RuntimeError(f"createdb failed: {result.stderr}")
        return f"postgresql+psycopg://postgres@/{name}?host={self.root}"

    def stop(self) -> None:
        self._as_user("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
