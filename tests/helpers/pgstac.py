"""A real STAC API for tests: stac-fastapi-pgstac (uvicorn) over pgstac in a PostgreSQL 15 with
PostGIS that the tests start themselves, on free ports of 127.0.0.1, in a temporary folder.

PostgreSQL refuses to run as root: as root its commands run as the ``postgres`` user (``runuser``),
in a folder that user owns. ``pypgstac`` installs the pgstac schema (``Migrate``) and loads
collections and Items. The API reads its database from the ``PG*`` variables
(``stac_fastapi.pgstac.config.PostgresSettings``). Everything is stopped and deleted by ``stop``.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_SHARE = Path("/usr/share/postgresql/15")
START_TIMEOUT_S = 90


def missing() -> str | None:
    """Why the server cannot be started here (the reason a test skips with), or None."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL 15 not installed ({PG_BIN}/initdb missing; apt-get install postgresql-15)"
    if not (PG_SHARE / "extension" / "postgis.control").exists():
        return "PostGIS not installed for PostgreSQL 15 (apt-get install postgresql-15-postgis-3; .ci/run does)"
    for module in ("stac_fastapi.pgstac", "pypgstac", "uvicorn", "psycopg"):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed (make install: the dev extra)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' user to run PostgreSQL as"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgstacServer:
    """PostgreSQL + pgstac + stac-fastapi-pgstac; ``url`` is the API's landing page."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="geoseg-pgstac-"))
        self.pg_port, self.api_port = free_port(), free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"
        self.url = f"http://127.0.0.1:{self.api_port}"
        self._api: subprocess.Popen[bytes] | None = None
        self._pg_started = False

    # ---------------------------------------------------------------- start and stop

    def start(self) -> PgstacServer:
        try:
            self._start_postgres()
            from pypgstac.db import PgstacDB
            from pypgstac.migrate import Migrate

            with PgstacDB(dsn=self.dsn) as db:
                Migrate(db).run_migration()
            self._start_api()
        except BaseException:
            self.stop()
            raise
        return self

    def _as_postgres(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def _start_postgres(self) -> None:
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        data = self.root / "data"
        subprocess.run(
            self._as_postgres(
                str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = (
            f"-p {self.pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._pg_started = True
        subprocess.run(
            self._as_postgres(
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(self.root / "postgres.log"),
                "-o",
                options,
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "start",
            ),
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT_S + 10,
        )

    def _start_api(self) -> None:
        env = {
            **os.environ,
            "PGUSER": "postgres",
            "PGPASSWORD": "unused",  # trust authentication on 127.0.0.1; the API's settings require one
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.pg_port),
            "PGDATABASE": "postgres",
        }
        log = open(self.root / "api.log", "wb")  # the server's output, read on failure
        self._api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "stac_fastapi.pgstac.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
                "--log-level",
                "warning",
            ],
            cwd=self.root,  # its settings also read a .env in the working folder: none here
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._api.poll() is not None:
                raise RuntimeError(f"stac-fastapi-pgstac exited: {self._log_tail('api.log')}")
            try:
                with urllib.request.urlopen(f"{self.url}/_mgmt/ping", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"stac-fastapi-pgstac did not answer in {START_TIMEOUT_S} s: {self._log_tail('api.log')}")

    def _log_tail(self, name: str) -> str:
        try:
            return " | ".join((self.root / name).read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the API and PostgreSQL and delete their folder (every step tried, whatever failed)."""
        if self._api is not None:
            self._api.terminate()
            try:
                self._api.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._api.kill()
                self._api.wait(timeout=15)
            self._api = None
        if self._pg_started:
            subprocess.run(
                self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop"),
                capture_output=True,
                timeout=60,
            )
            self._pg_started = False
        shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------- data

    def load_collection(self, collection: dict[str, Any]) -> None:
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods

        with PgstacDB(dsn=self.dsn) as db:
            Loader(db).load_collections(iter([collection]), Methods.upsert)

    def load_items(self, items: list[dict[str, Any]]) -> None:
        """Insert or replace Items (their ``collection`` must be loaded)."""
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods

        with PgstacDB(dsn=self.dsn) as db:
            Loader(db).load_items(iter(items), Methods.upsert)
