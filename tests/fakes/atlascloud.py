"""A wire-level fake of the Atlas Cloud media API.

What it reproduces, as the provider's documentation, its official MCP server and its ComfyUI client
describe it:
* `Authorization: Bearer <key>` on every API call; 401 `{code, message}` otherwise (the documented
  403 for a key without permission has the same shape).
* `POST /api/v1/model/generateImage` with a flat body or an `{"input": {...}}` body (merged, top level
  wins: the docs show both); validates model, `num_images` 1-4, `strength` 0-1, `size` "W*H"; answers
  the `{code: 200, data: {id, status: "created"}}` envelope (or the variants seen in the docs:
  top-level `id`, `predictionId`). Every accepted job is appended to `ledger`.
* `enable_sync_mode: true` holds the submit's answer until the job is done (at most `sync_timeout`
  seconds, after which it answers the job still `processing`, as the upstream WaveSpeed sync mode
  does) and then answers what a poll would: `completed` with outputs, or the HTTP 500 failure body.
  `enable_base64_output: true` makes outputs base64 strings (raw, or `data:` URIs with
  `base64_style="data_uri"`: the docs do not say which) instead of URLs.
* `GET /api/v1/model/prediction/{id}` (and the older `/model/getResult?predictionId=`): `created` ->
  `processing` -> `completed` as polls arrive; outputs as URL strings or objects; a failed task is
  HTTP 500 with `{code: 500, message, data: {status: "failed", error}}`; a "completed" task can have
  empty outputs with `has_nsfw_contents: [true]` (a content-safety block); unknown ids are 404.
* `GET /api/v1/model/history?no=&size=&model=&status=&sessionID=` (the official MCP server's history
  listing): every accepted job, newest first, `{code: 200, data: {items: [{ID, createdAt, model,
  requestBody, result, status}], pageNo, pageSize, total}}`; `no` is the 1-based page, `size` 1-50
  (clamped), `model` / `status` / `sessionID` (a job id) filter exactly; `createdAt` is whole epoch
  seconds; `requestBody` is the submit's JSON text exactly as it arrived; `status` is the job's
  (`created`, `processing`, `completed`, `failed`); `result` is what a status request would show.
* `POST /api/v1/model/uploadMedia` multipart `file` -> `{code: 200, message: "success", data: {type,
  download_url, filename, size}}`.
* Result and upload files are served from the fake's own host (`/files/...`, `/uploads/...`).

Knobs (set by tests): `polls_to_complete`, `hold` (jobs stay processing until `finish(id)`; a held
submit then answers `processing` at once), `answer_gate` (an accepted submit's answer waits until this
event is set: the job exists, its id not yet sent), `history_errors` (injected answers to history
requests), `outcome` ("ok", "fail", "nsfw"), `output_style` ("strings", "objects", "base64"),
`id_style`, `file_mode`, `duration`, and the shared ones of
`FakeBase` (`submit_errors`, `poll_errors`, `echo_key`, `revoke()`).
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2

from .base import Entry, FakeBase, Injected
from .wire import json_response, noise_png, png_bytes

KNOWN_MODELS = {
    "black-forest-labs/flux-schnell", "black-forest-labs/flux-dev", "black-forest-labs/flux-dev-lora",
    "black-forest-labs/flux-kontext-dev", "black-forest-labs/flux-kontext-dev-lora", "wavespeed-ai/flux-schnell",
}
NEEDS_IMAGE = {"black-forest-labs/flux-kontext-dev", "black-forest-labs/flux-kontext-dev-lora"}


@dataclass
class Job:
    id: str
    body: dict[str, Any]
    polls: int = 0
    done: bool = False
    outcome: str = "ok"
    created: float = field(default_factory=time.monotonic)
    created_at: int = field(default_factory=lambda: int(time.time()))
    """When the job was created, as the history lists it (whole epoch seconds)."""
    sent: str = ""
    """The submit's body exactly as it arrived (the history's `requestBody`)."""


UNAUTHORIZED = {"code": 401, "message": "Unauthorized: invalid or expired API key"}
FORBIDDEN = {"code": 403, "message": "Permission denied: this API key may not use this model"}


@dataclass
class AtlasFake(FakeBase):
    key_headers = ("authorization",)
    key_scheme = "Bearer "
    key: str
    polls_to_complete: int = 1
    hold: bool = False
    outcome: str = "ok"
    output_style: str = "strings"
    id_style: str = "data.id"
    price: float | None = 0.003
    jobs: dict[str, Job] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    image_size: tuple[int, int] = (64, 64)
    duration: float | None = None
    """When set, a job completes this many seconds after submit (wall clock), whatever the poll count."""
    file_mode: str = "ok"
    """How result files are served: ok, 404, redirect_loop, redirect:<url>, not_image, huge, slow, bomb."""
    noisy_images: bool = False
    catalogue: dict[str, float] = field(default_factory=lambda: {
        "black-forest-labs/flux-schnell": 0.003, "black-forest-labs/flux-dev": 0.012,
        "black-forest-labs/flux-kontext-dev": 0.025})
    """The public model catalogue's prices (USD per run), as `GET /api/v1/models` lists them."""
    extra_outputs: int = 0
    """A misbehaving provider: this many outputs beyond the `num_images` asked for."""
    """Serve incompressible images (realistic byte sizes) instead of flat colour."""
    sync_timeout: float = 60.0
    """The longest a sync-mode submit is held before it answers with the job still processing."""
    base64_style: str = "raw"
    """How base64 outputs look: "raw" or "data_uri"."""
    answer_gate: anyio.Event | None = None
    """When set, an accepted submit's answer is held until this event is set (the job exists meanwhile)."""
    history_errors: list[Entry] = field(default_factory=list)
    """Consumed one per history request, as `poll_errors` are per status request."""

    @property
    def expected_key(self) -> str:
        return self.key

    def unauthorized_answer(self, presented: str | None) -> Injected:
        return 401, UNAUTHORIZED, {}

    def forbidden_answer(self) -> Injected:
        return 403, FORBIDDEN, {}

    def finish(self, job_id: str) -> None:
        self.jobs[job_id].done = True

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = self.log(request)
        if request.method == "GET" and path.startswith(("/files/", "/uploads/")):
            return self._file(path)
        if request.method == "GET" and path == "/api/v1/models":  # the public catalogue: no key needed
            return json_response(200, {"code": 200, "data": [
                {"model": model, "type": "Image", "price": price} for model, price in self.catalogue.items()]})
        if (refused := self.check_key(request)) is not None:
            return refused
        if request.method == "POST" and path == "/api/v1/model/generateImage":
            before = len(self.ledger)
            response = self._submit(request)
            if len(self.ledger) > before:  # a job was accepted (not an injected answer)
                job = next(reversed(self.jobs.values()))
                if self.answer_gate is not None:
                    await self.answer_gate.wait()
                if job.body.get("enable_sync_mode") is True:
                    await self._sync_wait(job)
                    return self._answer(job, request)
            return response
        m = re.fullmatch(r"/api/v1/model/prediction/([^/]+)/?", path)
        if request.method == "GET" and m:
            return self._poll(m.group(1), request)
        if request.method == "GET" and path == "/api/v1/model/getResult":
            return self._poll(request.url.params.get("predictionId", ""), request)
        if request.method == "POST" and path == "/api/v1/model/uploadMedia":
            return self._upload(request)
        if request.method == "GET" and path == "/api/v1/model/history":
            return self._history(request)
        return json_response(404, {"code": 404, "message": "not found"})

    def _history(self, request: httpx2.Request) -> httpx2.Response:
        if (injected := self.take(self.history_errors, request)) is not None:
            return injected
        params = request.url.params
        try:
            page, size = int(params.get("no", "1")), int(params.get("size", "10"))
        except ValueError:
            return json_response(400, {"code": 400, "message": "no and size must be integers"})
        page, size = max(page, 1), min(max(size, 1), 50)
        rows = [(job, self.status_word(job)) for job in reversed(list(self.jobs.values()))]
        rows = [(job, status) for job, status in rows
                if params.get("model") in (None, "", job.body["model"]) and params.get("status") in (None, "", status)
                and params.get("sessionID") in (None, "", job.id)]
        rows.sort(key=lambda row: row[0].created_at, reverse=True)  # stable: newest first within a second too
        items = [{"ID": job.id, "createdAt": job.created_at, "model": job.body["model"], "requestBody": job.sent,
                  "status": status, "result": self._answer(job, request).json().get("data")}
                 for job, status in rows[(page - 1) * size : page * size]]
        return json_response(200, {"code": 200, "data": {"items": items, "pageNo": page, "pageSize": size,
                                                         "total": len(rows)}})

    def status_word(self, job: Job) -> str:
        """The job's status as the history lists it."""
        if not job.done:
            return "created" if job.polls == 0 else "processing"
        return "failed" if job.outcome == "fail" else "completed"

    def _submit(self, request: httpx2.Request) -> httpx2.Response:
        if (injected := self.take(self.submit_errors, request)) is not None:
            return injected
        try:
            raw = json.loads(request.content)
        except ValueError:
            return json_response(400, {"code": 400, "message": "invalid JSON body"})
        body = {**raw.get("input", {}), **{k: v for k, v in raw.items() if k != "input"}}
        model = body.get("model")
        if model not in KNOWN_MODELS:
            return json_response(400, {"code": 400, "message": f"model {model} not found"})
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return json_response(400, {"code": 400, "message": "prompt is required"})
        n = body.get("num_images", 1)
        if not isinstance(n, int) or not 1 <= n <= 4:
            return json_response(400, {"code": 400, "message": "num_images must be between 1 and 4"})
        if "strength" in body and not 0 <= body["strength"] <= 1:
            return json_response(400, {"code": 400, "message": "strength must be between 0 and 1"})
        if "size" in body and not re.fullmatch(r"\d+\*\d+", str(body["size"])):
            return json_response(400, {"code": 400, "message": "size must look like 1024*1024"})
        if model in NEEDS_IMAGE and not body.get("image"):
            return json_response(400, {"code": 400, "message": "image is required for this model"})
        job = Job(id=f"pred_{uuid.uuid4().hex[:16]}", body=body, outcome=self.outcome,
                  sent=request.content.decode())
        self.jobs[job.id] = job
        self.ledger.append(body)
        if self.id_style == "id":
            return json_response(200, {"id": job.id, "status": "processing", "model": model})
        if self.id_style == "predictionId":
            return json_response(200, {"code": 200, "data": {"predictionId": job.id, "status": "created"}})
        return json_response(200, {"code": 200, "data": {"id": job.id, "status": "created"}})

    def _poll(self, job_id: str, request: httpx2.Request) -> httpx2.Response:
        if (injected := self.take(self.poll_errors, request)) is not None:
            return injected
        job = self.jobs.get(job_id)
        if job is None:
            return json_response(404, {"code": 404, "message": f"prediction {job_id} not found"})
        job.polls += 1
        if self.duration is not None:
            job.done = job.done or time.monotonic() - job.created >= self.duration
        elif not self.hold and job.polls >= self.polls_to_complete:
            job.done = True
        return self._answer(job, request)

    async def _sync_wait(self, job: Job) -> None:
        """Sync mode: the answer waits for the job (up to `sync_timeout`)."""
        import anyio

        if self.duration is not None:
            remaining = job.created + self.duration - time.monotonic()
            await anyio.sleep(max(0.0, min(remaining, self.sync_timeout)))
            job.done = job.done or time.monotonic() - job.created >= self.duration
        elif not self.hold:
            job.done = True

    def image_bytes(self) -> bytes:
        return noise_png(*self.image_size) if self.noisy_images else png_bytes(*self.image_size)

    def _answer(self, job: Job, request: httpx2.Request) -> httpx2.Response:
        """The job as a status request (or a sync-mode submit) sees it now."""
        if not job.done:
            status = "created" if job.polls == 0 else "processing"
            return json_response(200, {"code": 200, "data": {"id": job.id, "status": status, "outputs": []}})
        if job.outcome == "fail":
            return json_response(500, {"code": 500, "message": "task failed",
                                       "data": {"id": job.id, "status": "failed",
                                                "error": self.echoed("NSFW content detected in prompt")}})
        if job.outcome == "nsfw":
            return json_response(200, {"code": 200, "data": {"id": job.id, "status": "completed", "outputs": [],
                                                             "has_nsfw_contents": [True]}})
        n = job.body.get("num_images", 1) + self.extra_outputs
        outputs: list[Any]
        if self.output_style == "base64" or job.body.get("enable_base64_output") is True:
            prefix = "data:image/png;base64," if self.base64_style == "data_uri" else ""
            outputs = [prefix + base64.b64encode(self.image_bytes()).decode() for _ in range(n)]
        else:
            outputs = [self.file_url(request, f"{job.id}-{i}.png") for i in range(n)]
            if self.output_style == "objects":
                outputs = [{"url": u} for u in outputs]
        data = {"id": job.id, "status": "completed", "outputs": outputs, "model": job.body["model"],
                "has_nsfw_contents": [False] * n, "created_at": "2026-01-01T00:00:00Z",
                "completed_at": "2026-01-01T00:00:02Z", "metrics": {"predict_time": 1.2}}
        if self.price is not None:
            data["price"] = self.price * n
        return json_response(200, {"code": 200, "data": data})

    def _upload(self, request: httpx2.Request) -> httpx2.Response:
        ctype = request.headers.get("content-type", "")
        if "multipart/form-data" not in ctype:
            return json_response(400, {"code": 400, "message": "multipart/form-data required"})
        m = re.search(rb'name="file"; filename="([^"]+)"\r\nContent-Type: ([^\r]+)\r\n\r\n(.*)\r\n--',
                      request.content, re.DOTALL)
        if not m:
            return json_response(400, {"code": 400, "message": "file part missing"})
        name = f"{uuid.uuid4().hex[:8]}-{m.group(1).decode()}"
        self.uploads[name] = m.group(3)
        base = f"{request.url.scheme}://{request.url.netloc.decode()}"
        return json_response(200, {"code": 200, "message": "success", "data": {
            "type": "image", "download_url": f"{base}/uploads/{name}", "filename": m.group(1).decode(),
            "size": len(m.group(3))}})

    def _file(self, path: str) -> httpx2.Response:
        mode = self.file_mode
        if path.startswith("/files/") and mode != "ok":
            if mode == "404":
                return httpx2.Response(404, text="expired")
            if mode == "redirect_loop":
                return httpx2.Response(302, headers={"location": path})
            if mode.startswith("redirect:"):
                return httpx2.Response(302, headers={"location": mode.removeprefix("redirect:")})
            if mode == "not_image":
                return httpx2.Response(200, text="<html>not an image</html>", headers={"content-type": "image/png"})
            if mode == "huge":
                return httpx2.Response(200, content=_endless(), headers={"content-type": "image/png"})
            if mode == "slow":
                return httpx2.Response(200, content=_slow_drip(png_bytes()), headers={"content-type": "image/png"})
            if mode == "bomb":
                return httpx2.Response(200, content=_bomb(), headers={"content-type": "image/png"})
        if path.startswith("/uploads/"):
            data = self.uploads.get(path.removeprefix("/uploads/"))
            if data is None:
                return httpx2.Response(404, text="no such upload")
            return httpx2.Response(200, content=data, headers={"content-type": "image/png"})
        return httpx2.Response(200, content=self.image_bytes(), headers={"content-type": "image/png"})


async def _endless() -> AsyncIterator[bytes]:
    """An image body that never ends (a byte cap must stop it)."""
    chunk = png_bytes()[:8] + b"\0" * (1024 * 1024 - 8)
    while True:
        yield chunk


async def _slow_drip(data: bytes) -> AsyncIterator[bytes]:
    """A body that arrives one byte every 0.2 s (an overall deadline must stop it)."""
    import anyio

    for i in range(len(data)):
        await anyio.sleep(0.2)
        yield data[i : i + 1]


def _bomb() -> bytes:
    """A tiny PNG that decodes to 12000 x 12000 pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG", optimize=True)
    return buf.getvalue()
