"""A wire-level fake of AceDataCloud's Flux API and its file upload.

What it reproduces, as the FluxAPI README, the newer integration guides, the OpenAPI document and the
official SDK describe it:
* `authorization: Bearer <token>` on every API call: none -> 400 `no_token`, a wrong one -> 401
  `invalid_token`, in the `{success: false, error: {code, message}, trace_id}` envelope; the documented
  403 is `used_up` (insufficient balance or no access rights).
* `POST /flux/images`: validates `action` (generate|edit), `prompt`, `model` (the OpenAPI enum;
  anything else is 400 `bad_request` "model is invalid."), `size` (required, as the OpenAPI says) per model:
  flux-dev/flux-pro `WxH` with 256 <= x <= 1440, a multiple of 32, or an aspect ratio; kontext and flux-2
  models an aspect ratio from the documented list only. `count` only with `action: generate` (400
  otherwise), a positive integer. Edits need an http(s) `image_url` and an edit model. Without `async` it
  answers like the README's synchronous example (`success/task_id/trace_id/data[]`); with `async: true` (or
  `callback_url`) it answers `{task_id, trace_id}` at once. Every accepted job is appended to `ledger`.
* `POST /flux/tasks`: `{"id", "action": "retrieve"}` returns the task record (`id, type, created_at,
  trace_id, request`, then `started_at`) without `response` until the job is done (after `polls_to_complete`
  polls, or held until `finish(id)`), then with `response`, `finished_at`, `elapsed`. Unknown ids answer
  `{}` (the OpenAPI's empty answer branch; that this is what an unknown id gets is inferred).
  `retrieve_batch` with `ids` answers `{items, count}`.
* Finished shapes: `response.success` with `data` as a list (default), as an object
  (`result_style="object"`), or the tutorial's `{"status": "success", "data": {...}}`
  (`result_style="status"`);
  failures as `{success: false, error: {code, message}}` (`outcome="fail"`); success without images
  (`outcome="empty"`); a task that stays unknown (`forget=True`: `{}` forever).
* `POST /api/v1/files/` (the platform host's upload, on the same fake: tests point both base URLs here):
  Bearer platform token, multipart `file` -> `{"file_url": ...}` (or `{"url": ...}` with
  `upload_style="url"`).
* Result images and uploads are served from the fake's own host (`/files/...`, `/uploads/...`).

Knobs: `sync` (answer synchronously even when `async` is asked), `id_style` ("task_id", "data.task_id", "id"),
`upload_errors` (a queue like `submit_errors`, for uploads), and the shared ones of `FakeBase`
(`submit_errors`, `poll_errors` (the /flux/tasks requests), `echo_key`, `revoke()`), e.g. the documented
`used_up` 403 and `too_many_requests` 429.

Not reproduced: the callback POST (the adapter never sends `callback_url`), the x402 payment flow, and
`application/x-ndjson` streaming; the docs give no pricing or balance headers, so neither does the fake.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx2

from .base import Entry, FakeBase, Injected
from .wire import json_response, png_bytes

PIXEL_MODELS = {"flux-dev", "flux-pro"}
RATIO_MODELS = {"flux-kontext-pro", "flux-kontext-max", "flux-2-flex", "flux-2-pro", "flux-2-max",
                "flux-2-klein"}
EDIT_MODELS = {"flux-kontext-pro", "flux-kontext-max", "flux-dev", "flux-pro", "flux-2-flex", "flux-2-pro",
               "flux-2-max"}
RATIOS = {"1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"}


def envelope(code: str, message: str) -> dict[str, Any]:
    """The documented error body."""
    return {"success": False, "error": {"code": code, "message": message}, "trace_id": str(uuid.uuid4())}


@dataclass
class Task:
    id: str
    body: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    polls: int = 0
    done: bool = False
    outcome: str = "ok"


@dataclass
class AceDataFake(FakeBase):
    key_headers = ("authorization",)
    key_scheme = "Bearer "
    token: str
    platform_token: str | None = None
    polls_to_complete: int = 1
    hold: bool = False
    sync: bool = False
    forget: bool = False
    outcome: str = "ok"
    result_style: str = "list"
    id_style: str = "task_id"
    upload_style: str = "file_url"
    upload_errors: list[Entry] = field(default_factory=list)
    tasks: dict[str, Task] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    image_size: tuple[int, int] = (64, 64)

    @property
    def expected_key(self) -> str:
        return self.token

    def unauthorized_answer(self, presented: str | None) -> Injected:
        if presented is None:
            return 400, envelope("no_token", "token is required"), {}
        return 401, envelope("invalid_token", "Unauthorized, invalid or missing token"), {}

    def forbidden_answer(self) -> Injected:
        return 403, envelope("used_up", "Insufficient balance or no access rights"), {}

    def finish(self, task_id: str) -> None:
        self.tasks[task_id].done = True

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = self.log(request)
        self.hosts.append(request.url.host)
        if request.method == "GET" and path.startswith(("/files/", "/uploads/")):
            return self._file(path)
        if request.method == "POST" and path == "/api/v1/files/":
            return self._upload(request)
        if (refused := self.check_key(request)) is not None:
            return refused
        try:
            body = json.loads(request.content)
        except ValueError:
            return json_response(400, envelope("bad_request", "request body is not JSON"))
        self.bodies.append(body)
        if request.method == "POST" and path == "/flux/images":
            return self._images(body, request)
        if request.method == "POST" and path == "/flux/tasks":
            return self._tasks(body, request)
        return json_response(404, envelope("no_api", f"no api for {path}"))

    # --- /flux/images -----------------------------------------------------------------------

    def _images(self, body: dict[str, Any], request: httpx2.Request) -> httpx2.Response:
        if (injected := self.take(self.submit_errors, request)) is not None:
            return injected
        problem = _invalid(body)
        if problem:
            return json_response(400, envelope("bad_request", problem))
        task = Task(id=str(uuid.uuid4()), body=body, outcome=self.outcome)
        self.tasks[task.id] = task
        self.ledger.append(body)
        if self.sync or not (body.get("async") or body.get("callback_url")):
            task.done = True
            return json_response(200, self._result(task, request))
        trace = str(uuid.uuid4())
        if self.id_style == "data.task_id":
            return json_response(200, {"data": {"task_id": task.id}, "trace_id": trace})
        if self.id_style == "id":
            return json_response(200, {"id": task.id, "trace_id": trace})
        return json_response(200, {"task_id": task.id, "trace_id": trace})

    def _result(self, task: Task, request: httpx2.Request) -> dict[str, Any]:
        """The finished answer: the sync body, the callback body and a task record's `response` alike."""
        trace = str(uuid.uuid4())
        if task.outcome == "fail":
            return {"success": False, "task_id": task.id, "trace_id": trace,
                    "error": {"code": "bad_request",
                              "message": self.echoed("The prompt was flagged by content moderation.")}}
        n = task.body.get("count", 1) if task.outcome != "empty" else 0
        items = [{"prompt": task.body["prompt"], "image_url": self.file_url(request, f"{task.id}-{i}.png"),
                  "seed": 281520112 + i, "timings": {"inference": 3.193}} for i in range(n)]
        if self.result_style == "status":
            return {"status": "success", "task_id": task.id, "data": items[0] if len(items) == 1 else items}
        data: Any = items[0] if self.result_style == "object" and len(items) == 1 else items
        return {"success": True, "task_id": task.id, "trace_id": trace, "data": data}

    # --- /flux/tasks ------------------------------------------------------------------------

    def _tasks(self, body: dict[str, Any], request: httpx2.Request) -> httpx2.Response:
        if (injected := self.take(self.poll_errors, request)) is not None:
            return injected
        action = body.get("action", "retrieve")
        if action == "retrieve_batch":
            items = [self._record(self.tasks[i], request) for i in body.get("ids", []) if i in self.tasks]
            return json_response(200, {"items": items, "count": len(items)})
        if action != "retrieve" or not isinstance(body.get("id"), str):
            return json_response(400, envelope("bad_request", "id is required"))
        task = self.tasks.get(body["id"])
        if task is None or self.forget:
            return json_response(200, {})
        task.polls += 1
        if not self.hold and task.polls >= self.polls_to_complete:
            task.done = True
        return json_response(200, self._record(task, request))

    def _record(self, task: Task, request: httpx2.Request) -> dict[str, Any]:
        record: dict[str, Any] = {
            "_id": uuid.uuid4().hex[:24], "id": task.id, "type": "images", "api_id": "flux-images",
            "application_id": "app-1", "created_at": task.created_at, "trace_id": str(uuid.uuid4()),
            "request": {k: v for k, v in task.body.items() if k != "async"},
        }
        if task.polls > 0 or task.done:
            record["started_at"] = task.created_at + 0.06
        if task.done:
            record["finished_at"] = task.created_at + 9.6
            record["elapsed"] = 9.6
            record["response"] = self._result(task, request)
        return record

    # --- platform upload and files ----------------------------------------------------------

    def _upload(self, request: httpx2.Request) -> httpx2.Response:
        if (injected := self.take(self.upload_errors, request)) is not None:
            return injected
        if not self.platform_token or request.headers.get("authorization") != f"Bearer {self.platform_token}":
            return json_response(401, {"detail": "Authentication credentials were not provided or are "
                                                 "invalid."})
        ctype = request.headers.get("content-type", "")
        m = re.search(rb'name="file"; filename="([^"]+)"\r\nContent-Type: ([^\r]+)\r\n\r\n(.*)\r\n--',
                      request.content, re.DOTALL)
        if "multipart/form-data" not in ctype or not m:
            return json_response(400, {"detail": "multipart field `file` is required"})
        name = f"{uuid.uuid4().hex[:8]}-{m.group(1).decode()}"
        self.uploads[name] = m.group(3)
        url = f"{request.url.scheme}://{request.url.netloc.decode()}/uploads/{name}"
        return json_response(200, {self.upload_style: url})

    def _file(self, path: str) -> httpx2.Response:
        if path.startswith("/uploads/"):
            data = self.uploads.get(path.removeprefix("/uploads/"))
            if data is None:
                return httpx2.Response(404, text="no such upload")
            return httpx2.Response(200, content=data, headers={"content-type": "image/png"})
        return httpx2.Response(200, content=png_bytes(*self.image_size),
                               headers={"content-type": "image/png"})


def _invalid(body: dict[str, Any]) -> str | None:
    """Why a /flux/images body is refused (None: it is accepted)."""
    action, model = body.get("action"), body.get("model", "flux-dev")
    if action not in ("generate", "edit"):
        return "action must be generate or edit."
    if not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
        return "prompt is required."
    if model not in PIXEL_MODELS | RATIO_MODELS:
        return "model is invalid."
    size = body.get("size")
    if not isinstance(size, str):
        return "size is required."
    if model in RATIO_MODELS and size not in RATIOS:
        return f"size {size!r} is invalid for {model}: use one of {', '.join(sorted(RATIOS))}."
    if model in PIXEL_MODELS and size not in RATIOS:
        m = re.fullmatch(r"(\d+)x(\d+)", size)
        if not m or any(not 256 <= int(x) <= 1440 or int(x) % 32 for x in m.groups()):
            return f"size {size!r} is invalid for {model}: WxH with 256 <= x <= 1440, multiples of 32."
    if "count" in body:
        if action != "generate":
            return "count is only valid for image generation, not for editing."
        if not isinstance(body["count"], int) or isinstance(body["count"], bool) or body["count"] < 1:
            return "count must be a positive integer."
    if action == "edit":
        if not str(body.get("image_url", "")).startswith(("http://", "https://")):
            return "image_url must be a direct http(s) image URL."
        if model not in EDIT_MODELS:
            return f"model {model} does not support editing."
    return None
