"""The shared mode's real parts for tests, started on this machine, loopback only.

* PostgreSQL from the distribution's packages (installed with apt-get when no `initdb` is found). It
  refuses to run as root, and CI runs as root, so the cluster is owned by and run as the `postgres`
  user in a throwaway folder, listening on 127.0.0.1 and a socket in that folder only, with
  `fsync=off` (a test cluster: nothing in it needs to survive a power cut).
* moto's S3 server (`moto[server]`, the `test` extra) in a thread on 127.0.0.1.

Both are started once per test session (`Postgres.start()`, `MotoS3.start()`), each test module gets
a database of its own (`Postgres.create_database`), each test a bucket of its own.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.fakes.wire import free_port

S3_KEY_ID = "testing-key-id"
S3_SECRET = "testing-secret-0b1c2d3e4f"
S3_REGION = "us-east-1"


def _initdb() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]) if found else None


def ensure_postgres_installed() -> Path:
    """The folder of the newest PostgreSQL server programs, installing Debian's `postgresql` if none is."""
    initdb = _initdb()
    if initdb is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise RuntimeError("PostgreSQL is not installed: install the `postgresql` package (Debian/Ubuntu) "
                               "or run the tests as root so they can")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"], check=True,
                       env=env, stdout=subprocess.DEVNULL)
        initdb = _initdb()
        if initdb is None:
            raise RuntimeError("apt-get installed postgresql but no initdb was found under /usr/lib/postgresql")
    return initdb.parent


def _as_postgres(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    """Runs a server program as the `postgres` user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (superuser `flux`, trust authentication)."""

    folder: Path
    bin: Path
    port: int
    databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://flux@127.0.0.1:{self.port}/{database}"

    @classmethod
    def start(cls, *, durable: bool = False) -> Postgres:
        """`durable`: fsync and synchronous commits on, as in production (the benchmark); else off (tests)."""
        pgbin = ensure_postgres_installed()
        folder = Path(tempfile.mkdtemp(prefix="flux-pg-"))
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        pg = cls(folder, pgbin, free_port())
        _as_postgres([str(pgbin / "initdb"), "-D", str(pg.data), "-A", "trust", "-U", "flux", "--no-sync",
                      "-E", "UTF8", "--locale=C"])
        speed = "" if durable else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        options = (f"-h 127.0.0.1 -p {pg.port} -k {folder} {speed}-c max_connections=300 "
                   "-c shared_buffers=32MB")
        try:
            _as_postgres([str(pgbin / "pg_ctl"), "-D", str(pg.data), "-l", str(folder / "log"), "-o", options,
                          "-w", "-t", "60", "start"])
        except subprocess.CalledProcessError as exc:
            log = (folder / "log").read_text(errors="replace") if (folder / "log").exists() else ""
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr.decode(errors='replace')}\n{log}") from None
        return pg

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            _as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.folder, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Runs SQL through psql (as the test's own client, over TCP) and returns its output."""
        out = subprocess.run([str(self.bin / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql,
                              self.url(database)], check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.psql(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return name

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class MotoS3:
    """moto's S3 server in a thread on 127.0.0.1."""

    server: object
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls) -> MotoS3:
        from moto.server import ThreadedMotoServer

        port = free_port()
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        return cls(server, port)

    def stop(self) -> None:
        self.server.stop()  # type: ignore[attr-defined]

    def env(self, bucket: str) -> dict[str, str]:
        """The variables a flux-mcp server reads to store images in `bucket` here."""
        return {"FLUX_MCP_S3_URL": f"s3://{bucket}", "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": S3_REGION,
                "AWS_ALLOW_HTTP": "true"}

    def create_bucket(self) -> str:
        import httpx2

        name = f"flux-{uuid.uuid4().hex[:12]}"
        # moto accepts unsigned requests: a bucket is one PUT.
        httpx2.put(f"{self.endpoint}/{name}", timeout=10).raise_for_status()
        return name

    def _client(self, bucket: str) -> object:
        from obstore.store import S3Store

        return S3Store(bucket, endpoint=self.endpoint, access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET,
                       region=S3_REGION, client_options={"allow_http": True})

    def read(self, bucket: str, key: str) -> bytes | None:
        """An object's bytes, read with the test credentials (None when there is no such object)."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return bytes(obstore.get(self._client(bucket), key).bytes())  # type: ignore[arg-type]
        except (NotFoundError, FileNotFoundError):
            return None

    def keys(self, bucket: str) -> list[str]:
        """The object keys in `bucket` (moto's listing, read without signing)."""
        import re

        import httpx2

        body = httpx2.get(f"{self.endpoint}/{bucket}?list-type=2", timeout=10).text
        return re.findall(r"<Key>([^<]+)</Key>", body)


RUNNING: list[MotoS3] = []
"""The S3 server of this test session, once started (for `kept_bytes`)."""


@contextlib.contextmanager
def services() -> Iterator[tuple[Postgres, MotoS3]]:
    pg = Postgres.start()
    try:
        s3 = MotoS3.start()
        RUNNING.append(s3)
        try:
            yield pg, s3
        finally:
            RUNNING.remove(s3)
            s3.stop()
    finally:
        pg.stop()


def kept_bytes(location: str) -> bytes | None:
    """The bytes a result's `images[].path` names: a file, or an object in the session's bucket (None: gone)."""
    if location.startswith("s3://"):
        bucket, _, key = location.removeprefix("s3://").partition("/")
        return RUNNING[0].read(bucket, key)
    path = Path(location)
    return path.read_bytes() if path.is_file() else None


def ensure_haproxy() -> str:
    """The haproxy program, installing Debian's `haproxy` package when it is missing."""
    found = shutil.which("haproxy") or (Path("/usr/sbin/haproxy").exists() and "/usr/sbin/haproxy")
    if found:
        return str(found)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError("haproxy is not installed: install the `haproxy` package or run the tests as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "haproxy"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return shutil.which("haproxy") or "/usr/sbin/haproxy"
