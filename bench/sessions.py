"""Opening flux-mcp and the floor over either transport, as bare sessions (bench/raw.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .common import base_env, floor_command, flux_command, http_server
from .raw import RawHttp, RawStdio

TRANSPORTS = ("stdio", "streamable-http")


@contextlib.contextmanager
def flux(transport: str, env: dict[str, str], cwd: Path, logs: Path) -> Iterator[RawStdio | RawHttp]:
    log = logs / f"flux-{transport}.log"
    if transport == "stdio":
        with open(log, "wb") as err, RawStdio(flux_command(), env, cwd, stderr=err) as session:
            session.initialize()
            yield session
        return
    with (
        http_server([*flux_command(), "serve", "--transport", "streamable-http"], env, cwd, log) as (url, _),
        RawHttp(f"{url}/mcp") as session,
    ):
        yield session


@contextlib.contextmanager
def floor(transport: str, home: Path, cwd: Path, logs: Path) -> Iterator[RawStdio | RawHttp]:
    env = base_env(home)
    if transport == "stdio":
        with RawStdio(floor_command(), env, cwd) as session:
            session.initialize()
            yield session
        return
    with (
        http_server(floor_command(), env, cwd, logs / "floor-http.log") as (url, _),
        RawHttp(f"{url}/mcp") as session,
    ):
        yield session
