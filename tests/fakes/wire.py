"""Running a wire-level fake two ways: behind `httpx2.MockTransport` in-process, or on a loopback port.

A fake is any object with `async def handle(request: httpx2.Request) -> httpx2.Response`. The same
object serves both ways, so in-process tests and subprocess tests exercise one implementation.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import httpx2
from PIL import Image


class Fake(Protocol):
    async def handle(self, request: httpx2.Request) -> httpx2.Response: ...


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx2.Response:
    return httpx2.Response(status, json=body, headers=headers)


def png_bytes(width: int = 64, height: int = 64, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def noise_png(width: int, height: int, seed: int = 1) -> bytes:
    """An incompressible PNG (random pixels): the byte size of a real photo-like result, or more."""
    import random

    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def jpeg_bytes(width: int = 64, height: int = 64, color: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def mock_transport(fake: Fake) -> httpx2.MockTransport:
    return httpx2.MockTransport(fake.handle)


class AsgiAdapter:
    """Serves a fake's `handle` as an ASGI app (for uvicorn on 127.0.0.1)."""

    def __init__(self, fake: Fake):
        self.fake = fake

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        host = dict(scope["headers"]).get(b"host", b"127.0.0.1").decode()
        query = scope.get("query_string", b"").decode()
        url = f"http://{host}{scope['path']}" + (f"?{query}" if query else "")
        request = httpx2.Request(scope["method"], url, headers=[(k, v) for k, v in scope["headers"]], content=body)
        response = await self.fake.handle(request)
        content = response.content if hasattr(response, "_content") else await response.aread()
        headers = [(k.encode(), v.encode()) for k, v in response.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")]
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_on_loopback(fake: Fake) -> Iterator[str]:
    """Runs the fake on 127.0.0.1 in a background thread; yields its base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(AsgiAdapter(fake), host="127.0.0.1", port=port, log_level="warning",
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
