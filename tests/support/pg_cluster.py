"""A throwaway PostgreSQL cluster for fault tests that stop and start the server.

``initdb`` into a fresh temporary directory, ``postgres`` on a free loopback port with its
socket in that directory, one database migrated to head; ``destroy`` stops it and deletes
everything. The machine's own cluster (and ``KLMON_TEST_PG_URL``) is never touched.

PostgreSQL refuses to run as root, so under root every server command runs as the
``postgres`` user (``runuser -u postgres --``) in a directory that user owns; it lives in
the system temporary directory because pytest's ``tmp_path`` is private to root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy import text

from monitor.store.engine import make_engine
from support.db import migrate


class ClusterUnavailable(RuntimeError):
    """The PostgreSQL server binaries (or a user to run them as) are missing."""


def server_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb, else initdb on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise ClusterUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found under "
        "/usr/lib/postgresql/*/bin or on PATH"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayCluster:
    """One private PostgreSQL server; ``url`` is its migrated database."""

    def __init__(self) -> None:
        self.bindir = server_bindir()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ClusterUnavailable(
                    "running as root and there is no 'postgres' user to run the server as"
                ) from exc
        self.root = Path(tempfile.mkdtemp(prefix="klmon-pg-"))
        if self.as_root:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data = self.root / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/klmon"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({done.returncode}): "
                f"{done.stderr.strip() or done.stdout.strip()}\n{tail}"
            )

    def create(self) -> ThrowawayCluster:
        """initdb, start, create the ``klmon`` database and migrate it to head."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--no-instructions")  # fmt: skip
        self.start()
        admin = make_engine(self.url.rpartition("/")[0] + "/postgres", isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text("CREATE DATABASE klmon"))
        finally:
            admin.dispose()
        migrate(self.url)
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c full_page_writes=off -c max_connections=40"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        """Stop the server if it runs and delete its directory."""
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
