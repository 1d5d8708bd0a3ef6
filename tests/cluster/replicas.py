"""Several `flux-mcp serve --transport streamable-http` replicas behind haproxy, on one PostgreSQL database
and one bucket: what the cluster tests (tests/cluster/test_replicas.py) and the kill benchmark
(`python -m bench.cluster`) both run.

The pieces, all on loopback:

* PostgreSQL and the S3 endpoint come from `tests/cluster_env.py` (the tests' session services; the
  benchmark starts its own: a durable PostgreSQL and moto in a process of its own, `MotoProcess`).
* Each replica is the real command in a child process with the shared-mode variables
  (FLUX_MCP_DATABASE_URL, FLUX_MCP_S3_URL, AWS_*), named tokens (FLUX_MCP_AUTH_TOKENS), Atlas Cloud
  pointed at a fake, and `ATLASCLOUD_SYNC_MODE=off` (a held submit has no id another replica could
  recover). Shared mode serves streamable HTTP statelessly: any replica answers any request.
* haproxy runs deploy/haproxy.cfg as written (retries on connection failure only, never a POST that
  reached a replica), with its address and servers moved to loopback ports, and one addition: the name
  of the replica that answered, in an `x-flux-replica` response header (tests and the benchmark tell
  the replicas' calls apart by it).

`Cluster` starts all replicas at the same moment (they migrate a fresh database together), SIGKILLs one
(`kill`), restarts it (`restart`), finds the replica whose log shows a job (`holding`) or whose process a
row's lease names (`owning`), and reads the journal's rows (`rows`). `nonce_of` / `submits_per_nonce` count the fake's accepted submits per call.

This lives under tests/ because the benchmark already builds on the tests' fakes and process helpers
(bench/fake.py is the tests' Atlas fake with a clock); one harness keeps both on the same setup.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx2

from tests.cluster_env import MotoS3, ensure_haproxy
from tests.fakes.wire import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPLICA_HEADER = "x-flux-replica"
"""The response header haproxy adds here: the name (flux-1, flux-2, ...) of the replica that answered."""
_NONCE = re.compile(r"\[nonce=([A-Za-z0-9_-]+)\]")


def new_nonce() -> str:
    return uuid.uuid4().hex[:16]


def with_nonce(prompt: str, nonce: str) -> str:
    """A prompt that names its call: the fake counts accepted submits per nonce (`submits_per_nonce`)."""
    return f"{prompt} [nonce={nonce}]"


def nonce_of(prompt: str) -> str | None:
    m = _NONCE.search(prompt)
    return m.group(1) if m else None


def submits_per_nonce(bodies: Iterable[Mapping[str, Any]]) -> Counter[str]:
    """Accepted submits per call, from the bodies a fake accepted (`AtlasFake.ledger`)."""
    return Counter(n for b in bodies if (n := nonce_of(str(b.get("prompt", "")))) is not None)


# --- haproxy ----------------------------------------------------------------------------------------

def haproxy_config(port: int, replicas: list[tuple[str, int]], *, check_interval: str | None = None,
                   check_timeout: str | None = None) -> str:
    """deploy/haproxy.cfg with its listening address on 127.0.0.1:`port`, its servers the given (name, port)
    pairs on loopback, no docker DNS, no log line, and the answering replica named in `x-flux-replica`.
    `check_interval` replaces the health-check interval (None: as deployed)."""
    out: list[str] = []
    skipping = False
    for line in (DEPLOY / "haproxy.cfg").read_text().splitlines():
        stripped = line.strip()
        if line.startswith("resolvers "):
            skipping = True  # docker's DNS: not here
            continue
        if skipping:
            skipping = bool(stripped)
            continue
        if stripped.startswith("log stdout"):
            continue
        if stripped.startswith("bind "):
            line = f"    bind 127.0.0.1:{port}"
        if stripped.startswith("default-server"):
            line = line.replace(" resolvers docker", "").replace(" init-addr last,libc,none", "")
            if check_interval:
                line = re.sub(r"\binter \S+", f"inter {check_interval}", line)
        if stripped.startswith("server "):
            continue  # replaced below, after the backend's other lines
        out.append(line)
        if check_timeout and line.startswith("defaults"):
            out.append(f"    timeout check {check_timeout}")
    if not any(line.startswith("backend ") for line in out):
        raise RuntimeError("deploy/haproxy.cfg has no backend section")
    out.append(f"    http-response set-header {REPLICA_HEADER} %[srv_name]")
    out.extend(f"    server {name} 127.0.0.1:{p}" for name, p in replicas)
    return "\n".join(out) + "\n"


# --- moto in a process of its own (the benchmark: the S3 endpoint must not share the driver's GIL) ------

@dataclass
class MotoProcess(MotoS3):
    """moto's S3 server (`moto_server`) in a child process on 127.0.0.1; the same helpers as `MotoS3`."""

    @classmethod
    def start(cls) -> MotoProcess:
        port = free_port()
        exe = Path(sys.executable).parent / "moto_server"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_http(f"http://127.0.0.1:{port}/", proc, limit=60, ok=lambda r: r.status_code < 500)
        return cls(proc, port)

    def stop(self) -> None:
        proc: subprocess.Popen[bytes] = self.server  # type: ignore[assignment]
        _stop(proc)


# --- processes ----------------------------------------------------------------------------------------

def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_http(url: str, proc: subprocess.Popen[bytes] | None, *, limit: float,
               ok: Any = lambda r: r.status_code == 200) -> None:
    """Returns once GET `url` answers as `ok` says; raises when `proc` exits first or `limit` seconds pass.
    (A start-up wait, not a test's assertion: the deadline only bounds it.)"""
    deadline = time.monotonic() + limit
    last = "no answer"
    with httpx2.Client(timeout=2, trust_env=False) as http:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
            try:
                r = http.get(url)
                if ok(r):
                    return
                last = f"HTTP {r.status_code} {r.text[:200]}"
            except httpx2.TransportError as exc:
                last = type(exc).__name__
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready within {limit:g} s ({last})")


def flux_command() -> list[str]:
    """`flux-mcp` from the running interpreter's environment (the console script users launch)."""
    script = Path(sys.executable).parent / "flux-mcp"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "flux_mcp"]


@dataclass
class Replica:
    name: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    """N replicas of the real command on one database and bucket, haproxy in front (see the module doc)."""

    workdir: Path
    database_url: str
    s3_env: dict[str, str]
    fake_url: str
    api_key: str
    tokens: dict[str, str]
    """principal -> bearer token (FLUX_MCP_AUTH_TOKENS)."""
    size: int = 3
    env: dict[str, str] = field(default_factory=dict)
    """Extra variables for every replica (FLUX_MCP_LOG_LEVEL, lease settings, ...)."""
    check_interval: str | None = None
    """haproxy's health-check interval (None: as deployed, 2 s, which is also each check's timeout). A
    killed replica refuses connections at once, and haproxy retries those on another (`retry-on
    conn-failure`, `option redispatch`) until its checks mark it down. A shorter interval marks busy
    replicas down: on a loaded 2-core machine `/readyz` (a database and a bucket request) can take
    longer than 500 ms, and with every replica down haproxy answers 503."""
    check_timeout: str | None = None
    """haproxy's `timeout check` (None: as deployed, unset, so a check must answer within its interval)."""
    balancer: bool = True
    """Start haproxy in front (False: the replicas only, each at its own `url`)."""
    provider_via: bool = False
    """Each replica reaches the fake at `{fake_url}/via/<its name>` (a fake that strips the prefix can tell
    which replica sent each request: bench/fake.py, `ViaFake` in the rolling-restart test)."""
    replicas: list[Replica] = field(default_factory=list)
    haproxy: subprocess.Popen[bytes] | None = None
    lb_port: int = 0
    started_at: float = 0.0

    # --- life -------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.replicas = [Replica(f"flux-{i + 1}", free_port(), self.workdir / f"flux-{i + 1}.log")
                         for i in range(self.size)]
        self.started_at = time.monotonic()
        for r in self.replicas:  # all at once: they migrate the (fresh) database together
            self._spawn(r)
        for r in self.replicas:
            _wait_http(f"{r.url}/readyz", r.proc, limit=90)
        if not self.balancer:
            return
        self.lb_port = free_port()
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.lb_port, [(r.name, r.port) for r in self.replicas],
                                      check_interval=self.check_interval, check_timeout=self.check_timeout))
        with open(self.workdir / "haproxy.log", "wb") as log:
            self.haproxy = subprocess.Popen([ensure_haproxy(), "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)
        self.wait_routed()

    def close(self) -> None:
        if self.haproxy is not None:
            _stop(self.haproxy)
            self.haproxy = None
        for r in self.replicas:
            if r.proc is not None:
                _stop(r.proc)

    def replica_env(self, r: Replica) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items()
                if k in ("PATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH", "SYSTEMROOT")}
        home = self.workdir / r.name
        home.mkdir(parents=True, exist_ok=True)
        return {**keep, "HOME": str(self.workdir), "FLUX_MCP_HOME": str(home), "PYTHONUNBUFFERED": "1",
                "FLUX_MCP_DATABASE_URL": self.database_url, **self.s3_env,
                "FLUX_MCP_AUTH_TOKENS": ",".join(f"{p}:{t}" for p, t in self.tokens.items()),
                "ATLASCLOUD_API_KEY": self.api_key,
                "ATLASCLOUD_BASE_URL": f"{self.fake_url}/via/{r.name}" if self.provider_via else self.fake_url,
                "ATLASCLOUD_SYNC_MODE": "off", **self.env}

    def _spawn(self, r: Replica) -> None:
        r.starts += 1
        log = open(r.log, "ab")  # noqa: SIM115 - the child holds it; closed when this process exits
        try:
            r.proc = subprocess.Popen(
                [*flux_command(), "serve", "--transport", "streamable-http", "--host", "127.0.0.1",
                 "--port", str(r.port)],
                env=self.replica_env(r), cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        finally:
            log.close()

    def wait_routed(self, limit: float = 30) -> None:
        """Returns once haproxy listens and routes to a ready replica."""
        _wait_http(f"{self.url}/readyz", self.haproxy, limit=limit)

    def wait_routed_to_all(self, limit: float = 30) -> None:
        """Returns once haproxy has routed a request to every replica since this was called (after a restart:
        its health checks marked the replica up again)."""
        seen: set[str] = set()
        deadline = time.monotonic() + limit
        with httpx2.Client(timeout=5, trust_env=False) as http:
            while len(seen) < len(self.replicas):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"haproxy routed only to {sorted(seen)} within {limit:g} s")
                with contextlib.suppress(httpx2.TransportError):
                    if name := http.get(f"{self.url}/readyz").headers.get(REPLICA_HEADER):
                        seen.add(name)
                time.sleep(0.02)

    # --- what tests and the benchmark do to it ----------------------------------------------------

    @property
    def url(self) -> str:
        """haproxy's address (the MCP endpoint is `{url}/mcp`)."""
        return f"http://127.0.0.1:{self.lb_port}"

    def by_name(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def kill(self, name: str) -> float:
        """SIGKILLs a replica (no graceful stop: its calls are cut, its leases left to expire); returns the
        moment (time.monotonic()) the signal was sent."""
        r = self.by_name(name)
        assert r.proc is not None
        at = time.monotonic()
        r.proc.send_signal(signal.SIGKILL)
        r.proc.wait()
        return at

    def terminate(self, name: str) -> float:
        """SIGTERMs a replica (its graceful stop: calls in flight are answered, its leases handed over at once);
        returns the moment (time.monotonic()) the signal was sent. `stopped` waits for the exit."""
        r = self.by_name(name)
        assert r.proc is not None
        at = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)
        return at

    def stopped(self, name: str, limit: float = 90) -> int:
        """Waits (bounded: a stop that hangs raises) until a replica's process exited; returns its exit status."""
        r = self.by_name(name)
        assert r.proc is not None
        try:
            return r.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} still running {limit:g} s after SIGTERM") from None

    def restart(self, name: str) -> None:
        """Starts a replica again on its port and waits until haproxy can route to it again."""
        r = self.by_name(name)
        if r.alive:
            raise RuntimeError(f"{name} is running")
        self._spawn(r)
        _wait_http(f"{r.url}/readyz", r.proc, limit=90)

    def holding(self, text: str) -> Replica | None:
        """The live replica whose log mentions `text` (a prediction id: it logs each job it submitted)."""
        return next((r for r in self.replicas if r.alive and text in r.log_text()), None)

    def owning(self, lease_owner: str | None) -> Replica | None:
        """The live replica a journal row's `lease_owner` (host:pid:random) names."""
        parts = (lease_owner or "").split(":")
        pid = int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None
        return next((r for r in self.replicas if r.alive and r.proc is not None and r.proc.pid == pid), None)

    def rows(self, psql: Any, database: str, where: str = "TRUE") -> list[dict[str, Any]]:
        """The journal's prediction rows (as JSON objects), read with `psql(sql, database)`."""
        sql = f"SELECT coalesce(json_agg(row_to_json(p)), '[]') FROM flux_predictions p WHERE {where}"
        return list(json.loads(psql(sql, database) or "[]"))


def list_keys(endpoint: str, bucket: str) -> list[str]:
    """Every object key in `bucket` at an S3 endpoint that answers unsigned requests (moto), page by page."""
    keys: list[str] = []
    token: str | None = None
    with httpx2.Client(timeout=60, trust_env=False) as http:
        while True:
            params = {"list-type": "2", **({"continuation-token": token} if token else {})}
            body = http.get(f"{endpoint}/{bucket}", params=params).text
            keys += re.findall(r"<Key>([^<]+)</Key>", body)
            m = re.search(r"<NextContinuationToken>([^<]+)</NextContinuationToken>", body)
            if "<IsTruncated>true</IsTruncated>" not in body or not m:
                return keys
            token = m.group(1)


# --- clients ------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def sdk_client(url: str, token: str, served_by: list[str] | None = None) -> AsyncIterator[Any]:
    """The mcp SDK's client over streamable HTTP at `{url}/mcp`, as `token`'s user; the `x-flux-replica` of
    every answer is appended to `served_by` (when given)."""
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def note(response: httpx2.Response) -> None:
        if served_by is not None and (name := response.headers.get(REPLICA_HEADER)):
            served_by.append(name)

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60, trust_env=False,
                                  event_hooks={"response": [note]}) as http:
        async with Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
            yield client


PROTOCOL = "2025-11-25"


class Cut(Exception):
    """A call whose answer never arrived: the replica died, haproxy answered 5xx, or the stream broke."""


@dataclass
class Answer:
    result: dict[str, Any]
    replica: str | None


async def call_tool(http: httpx2.AsyncClient, url: str, token: str, name: str,
                    arguments: dict[str, Any]) -> Answer:
    """One `tools/call` as a single POST to a stateless streamable-HTTP endpoint (`{url}/mcp`), as a bare
    client would send it: no SDK work timed with the server's. Raises `Cut` when no answer arrived."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": arguments}}
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json", "MCP-Protocol-Version": PROTOCOL}
    try:
        response = await http.post(f"{url}/mcp", json=body, headers=headers)
        text = response.text
    except httpx2.TransportError as exc:
        raise Cut(type(exc).__name__) from None
    replica = response.headers.get(REPLICA_HEADER)
    if response.status_code >= 500:
        raise Cut(f"HTTP {response.status_code} from {replica or 'haproxy'}: {text[:120]}")
    if response.status_code >= 400:
        raise RuntimeError(f"HTTP {response.status_code}: {text[:300]}")
    for line in text.splitlines() if response.headers.get("content-type", "").startswith("text/event-stream") \
            else [f"data:{text}"]:
        if not line.startswith("data:") or not line[5:].strip():
            continue
        message = json.loads(line[5:])
        if message.get("id") == 1:
            if "error" in message:
                raise RuntimeError(f"JSON-RPC error: {message['error']}")
            return Answer(dict(message["result"]), replica)
    raise Cut("the stream ended without an answer")
