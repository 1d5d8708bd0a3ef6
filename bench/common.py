"""What every figure shares: statistics, the flux-mcp and floor commands, the fake in its own process."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

import httpx2

from tests.fakes.wire import free_port
from tests.subprocess_helpers import wait_for_port

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
KEY = "bench-key-not-a-secret"
"""The API key the fake accepts: the bench never holds a real one."""
TOKENS_PER_BYTE = 0.25
"""A token estimate for JSON and English text (about 4 bytes a token); stated wherever it is used."""


# --- statistics -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def p50(values: Sequence[float]) -> float:
    return percentile(values, 50)


def p95(values: Sequence[float]) -> float:
    return percentile(values, 95)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def secs(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def kb(n: float) -> str:
    return f"{n / 1000:.1f} kB" if n < 1_000_000 else f"{n / 1_000_000:.2f} MB"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


# --- processes ----------------------------------------------------------------------------------------


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


SOURCE: Path | None = None
"""Another flux_mcp source tree (a `src` folder) that the servers the figures start run instead of the
installed package: `bench.run --before REV` measures that revision beside this one, in the same run."""


@contextlib.contextmanager
def running(source: Path | None) -> Iterator[None]:
    """Commands and environments made meanwhile run the package in `source` (None: the installed one)."""
    global SOURCE
    previous, SOURCE = SOURCE, source
    try:
        yield
    finally:
        SOURCE = previous


def flux_command() -> list[str]:
    """`flux-mcp` from the running interpreter's environment (the console script users launch); the
    `SOURCE` tree's package when one is set."""
    script = Path(sys.executable).parent / "flux-mcp"
    return [str(script)] if script.is_file() and SOURCE is None else [sys.executable, "-m", "flux_mcp"]


def floor_command(*args: str) -> list[str]:
    """The floor: a minimal server on the same `mcp` SDK with one trivial tool."""
    return [sys.executable, str(BENCH / "floor_server.py"), *args]


def base_env(home: Path) -> dict[str, str]:
    """A clean child environment: no provider keys, nothing from the caller but what Python needs."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if k in ("PATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH", "SYSTEMROOT")
    }
    if SOURCE is not None:  # ahead of the installed package on the import path
        keep["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE), keep.get("PYTHONPATH")]))
    return {**keep, "HOME": str(home), "PYTHONUNBUFFERED": "1"}


def flux_env(home: Path, fake_url: str, **extra: str) -> dict[str, str]:
    """flux-mcp pointed at the fake, its data folder and workspace in `home`."""
    (home / "workspace").mkdir(parents=True, exist_ok=True)
    return {
        **base_env(home),
        "FLUX_MCP_HOME": str(home / "flux-home"),
        "ATLASCLOUD_API_KEY": KEY,
        "ATLASCLOUD_BASE_URL": fake_url,
        "FLUX_MCP_ALLOWED_DIRS": str(home / "workspace"),
        "FLUX_MCP_LOG_LEVEL": "WARNING",
        **extra,
    }


def peak_rss_kb(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in kB, from /proc (Linux)."""
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used so far, from /proc (Linux)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return math.nan


@contextlib.contextmanager
def http_server(
    cmd: list[str], env: dict[str, str], cwd: Path, log: Path
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Runs an HTTP MCP server command (with `--port` appended); yields (base URL, process)."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, proc)
            yield f"http://127.0.0.1:{port}", proc
        finally:
            stop(proc)


# --- the fake, in its own process ---------------------------------------------------------------------


@dataclass
class FakeJob:
    """What the fake knows of one job (monotonic clock, comparable across processes on Linux)."""

    id: str
    model: str
    submitted: float
    complete_at: float | None
    polls: int
    done_seen_at: float | None
    nonce: str | None = None
    answered: float | None = None
    via: str | None = None
    poll_log: list[list[Any]] = field(default_factory=list)
    """[arrival, via] per status request (`via`: the replica that sent it, when the cluster names them)."""


class FakeProcess:
    """The time-based Atlas Cloud fake (bench/fake.py) on a loopback port, and its control endpoints."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._log: BinaryIO | None = None

    def __enter__(self) -> Self:
        port = free_port()
        env = {
            **base_env(self.workdir),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
        self._log = open(self.workdir / "fake.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fake", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(port, self.proc)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc)
        if self._log is not None:
            self._log.close()

    def jobs(self) -> dict[str, FakeJob]:
        data = httpx2.get(f"{self.url}/_bench/jobs", timeout=30).json()
        return {k: FakeJob(id=k, **v) for k, v in data["jobs"].items()}

    def configure(self, *, submit_delay: tuple[float, float]) -> None:
        """Makes the fake slow to answer submits (each job is created at once, its answer sent later)."""
        httpx2.post(f"{self.url}/_bench/config", json={"submit_delay": list(submit_delay)},
                    timeout=30).raise_for_status()

    def serve_image(
        self, fmt: str = "png", width: int = 64, height: int = 64, content: str = "flat"
    ) -> dict[str, Any]:
        response = httpx2.post(
            f"{self.url}/_bench/image",
            json={"format": fmt, "width": width, "height": height, "content": content},
            timeout=60,
        )
        response.raise_for_status()
        return dict(response.json())


def job_prompt(duration: float | None, label: str = "bench job") -> str:
    """A prompt the fake reads its job's length from (no length: done at the first status request)."""
    return label if duration is None else f"{label} [duration={duration:.4f}]"


def dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=float) + "\n")
