"""A wire-level fake of ImagePipeline: the FLUX Schnell `generate/v3` API, and the job API's image edits
and uploads.

What it reproduces, as the v3 documentation page, third-party code calling v3, and the job API's
documentation and official SDK describe them (v3 documents no errors, so its error answers take the
shapes the job API documents):
* The key in `API-Key` (v3 docs) or `X-API-Key` (the job API) on every API call; 401
  `{error, error_code, message}` otherwise (the job API's shape for every error).
* `POST /generate/v3` with the documented fields: `prompt` required (422 `{"detail": [{loc, msg, type}]}`
  when missing, the job API's validation answer), `samples` 1-4 and defaulting to **2** when left out,
  `width`/`height` at most 1536 (400 `INVALID_PARAMETERS` otherwise; the minimum and multiple are
  undocumented, so only positive integers are required), integer `num_inference_steps` and `seed`.
  Every accepted job is appended to `ledger` (what a user would pay for on a metered account).
* The answer is either `{status: "SUCCESS", download_urls: [...]}` at once, one URL per sample
  (`answer="success"`, optionally with an `id`), or `{status: "PENDING", id}` (`answer="pending"`).
* `GET /generate/v3/status/{id}`: PENDING for `polls_to_complete` polls (or until `finish(id)` when
  `hold`), then `{status: "SUCCESS", download_urls}`, or `FAILURE` (docs) / `FAILED` (third-party code)
  (`outcome`) with the reason under `failure_field` (`message` by default; which key it is, is
  undocumented). Unknown ids are 404 `NOT_FOUND`.
* `POST /edit/image/v1`: `prompt` and `input_image` required (422 `detail` when missing), `input_image`
  an http(s) URL or a list of two, `width`/`height` positive and at most 2048, `num_inference_steps`
  1-100, `guidance_scale` 0-20, `seed` an integer (400 `INVALID_PARAMETERS` otherwise). Accepted jobs
  go to `ledger` (with `"endpoint": "/edit/image/v1"`) and are answered `{job_id: "job_...", status:
  "queued", endpoint, estimated_time_seconds, queued_at}`.
* `GET /edit/image/v1/status/{job_id}`: `queued`, then `processing` until `polls_to_complete` polls
  (or `finish(id)` when `hold`), then `completed` with `result_url`, `result_mime_type` (webp, the
  default `output_format`, or the format asked), timings, `credits_charged`, `credits_amount` and
  `cost_usd`; or, with `job_outcome`, `failed` with `error`, `failure_reason_code` and `retryable`, or
  `cancelled`. Unknown ids are 404 `NOT_FOUND`.
* `POST /upload/image/v1`, multipart part `file` -> `{url, filename, content_type, size_bytes}`; the
  file is then served at that URL. Upload failures: a missing part is 422.
* Result and uploaded files are served from the fake's own host (`/files/...`, `/uploads/...`), without
  a key, like a CDN link.

Not reproduced: `queued_image_urls` (whether URLs appear while PENDING is undocumented), `webhook`,
`direct_link`, `batch_id`/`file_prefix`, `callback_url`, the job API's generate endpoint and the edit
fields this server does not send (`refine_strength`, `mask_segment`, ...).

Knobs (set by tests): `answer`, `success_id`, `polls_to_complete`, `hold`, `outcome` ("ok", "FAILURE",
"FAILED"), `failure_field`, `failure_message`, `job_outcome` ("ok", "failed", "cancelled"),
`failure_code`, `retryable`, and the shared ones of `FakeBase` (`submit_errors`, `poll_errors`,
`echo_key`, `revoke()`).
"""

from __future__ import annotations

import io
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx2
from PIL import Image

from .base import FakeBase, Injected
from .wire import jpeg_bytes, json_response, png_bytes

MAX_SIDE = 1536
EDIT_MAX_SIDE = 2048
EDIT = "/edit/image/v1"
_FORMATS = {"webp": "image/webp", "jpeg": "image/jpeg", "png": "image/png"}
UNAUTHORIZED = {"error": "Unauthorized", "error_code": "UNAUTHORIZED",
                "message": "Invalid or missing API key"}
FORBIDDEN = {"error": "Forbidden", "error_code": "FORBIDDEN",
             "message": "This API key has no access to generate/v3"}


@dataclass
class Job:
    id: str
    body: dict[str, Any]
    polls: int = 0
    done: bool = False


@dataclass
class ImagePipelineFake(FakeBase):
    key_headers = ("api-key", "x-api-key")
    key: str
    answer: str = "success"
    success_id: bool = False
    polls_to_complete: int = 1
    hold: bool = False
    outcome: str = "ok"
    failure_field: str = "message"
    failure_message: str = "CUDA out of memory on the dedicated server"
    job_outcome: str = "ok"
    failure_code: str = "MODEL_ERROR"
    retryable: bool = False
    jobs: dict[str, Job] = field(default_factory=dict)
    uploads: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    headers: list[dict[str, str]] = field(default_factory=list)
    image_size: tuple[int, int] = (64, 64)

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
        if request.method == "GET" and path.startswith("/files/"):
            fmt = path.rsplit(".", 1)[-1]
            return httpx2.Response(200, content=_image(fmt if fmt in _FORMATS else "png", *self.image_size),
                                   headers={"content-type": _FORMATS.get(fmt, "image/png")})
        if request.method == "GET" and path.startswith("/uploads/") and path[9:] in self.uploads:
            data, mime = self.uploads[path[9:]]
            return httpx2.Response(200, content=data, headers={"content-type": mime})
        self.headers.append(dict(request.headers))
        if (refused := self.check_key(request)) is not None:
            return refused
        if request.method == "POST" and path == "/generate/v3":
            return self._submit(request)
        m = re.fullmatch(r"/generate/v3/status/([^/]+)", path)
        if request.method == "GET" and m:
            return self._status(m.group(1), request)
        if request.method == "POST" and path == EDIT:
            return self._submit_edit(request)
        m = re.fullmatch(EDIT + r"/status/([^/]+)", path)
        if request.method == "GET" and m:
            return self._edit_status(m.group(1), request)
        if request.method == "POST" and path == "/upload/image/v1":
            return self._upload(request)
        return json_response(404, {"error": "Not Found", "error_code": "NOT_FOUND",
                                   "message": "no such endpoint"})

    def _submit(self, request: httpx2.Request) -> httpx2.Response:
        if (injected := self.take(self.submit_errors, request)) is not None:
            return injected
        try:
            body = json.loads(request.content)
        except ValueError:
            return _invalid("request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return json_response(422, {"detail": [{"loc": ["body", "prompt"], "msg": "field required",
                                                   "type": "value_error.missing"}]})
        samples = body.setdefault("samples", 2)
        if not _int(samples) or not 1 <= samples <= 4:
            return _invalid("samples must be between 1 and 4")
        for side in ("width", "height"):
            value = body.setdefault(side, 1024)
            if not _int(value) or not 0 < value <= MAX_SIDE:
                return _invalid(f"{side} must be a positive integer no larger than {MAX_SIDE}")
        for name in ("num_inference_steps", "seed"):
            if name in body and not _int(body[name]):
                return json_response(422, {"detail": [{"loc": ["body", name], "type": "type_error.integer",
                                                       "msg": "value is not a valid integer"}]})
        job = Job(id=uuid.uuid4().hex[:20], body=body)
        self.jobs[job.id] = job
        self.ledger.append(body)
        if self.answer == "pending":
            return json_response(200, {"status": "PENDING", "id": job.id})
        job.done = True
        answer = self._final(job, request)
        if not self.success_id:
            answer.pop("id", None)
        return json_response(200, answer)

    def _status(self, job_id: str, request: httpx2.Request) -> httpx2.Response:
        if (injected := self.take(self.poll_errors, request)) is not None:
            return injected
        job = self.jobs.get(job_id)
        if job is None:
            return json_response(404, {"error": "Not Found", "error_code": "NOT_FOUND",
                                       "message": f"job {job_id} not found"})
        job.polls += 1
        if not self.hold and job.polls >= self.polls_to_complete:
            job.done = True
        if not job.done:
            return json_response(200, {"status": "PENDING", "id": job.id})
        return json_response(200, self._final(job, request))

    def _final(self, job: Job, request: httpx2.Request) -> dict[str, Any]:
        if self.outcome in ("FAILURE", "FAILED"):
            reason = self.echoed(self.failure_message)
            return {"status": self.outcome, "id": job.id, self.failure_field: reason}
        urls = [self.file_url(request, f"{job.id}-{i}.png") for i in range(job.body["samples"])]
        return {"status": "SUCCESS", "id": job.id, "download_urls": urls}


    # --- the job API: edits and uploads ------------------------------------------------------------

    def _submit_edit(self, request: httpx2.Request) -> httpx2.Response:
        if (injected := self.take(self.submit_errors, request)) is not None:
            return injected
        try:
            body = json.loads(request.content)
        except ValueError:
            return _invalid("request body is not valid JSON")
        if not isinstance(body, dict):
            return _invalid("request body must be a JSON object")
        for name in ("prompt", "input_image"):
            if not body.get(name):
                return json_response(422, {"detail": [{"loc": ["body", name], "msg": "field required",
                                                       "type": "value_error.missing"}]})
        images = body["input_image"] if isinstance(body["input_image"], list) else [body["input_image"]]
        if len(images) > 2 or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                                      for u in images):
            return _invalid("input_image must be an image URL or a list of two")
        for side in ("width", "height"):
            if side in body and (not _int(body[side]) or not 0 < body[side] <= EDIT_MAX_SIDE):
                return _invalid(f"{side} must be a positive integer no larger than {EDIT_MAX_SIDE}")
        if "num_inference_steps" in body and (not _int(body["num_inference_steps"])
                                              or not 1 <= body["num_inference_steps"] <= 100):
            return _invalid("num_inference_steps must be between 1 and 100")
        scale = body.get("guidance_scale", 0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 <= scale <= 20:
            return _invalid("guidance_scale must be between 0 and 20")
        if "seed" in body and not _int(body["seed"]):
            return _invalid("seed must be an integer")
        if body.get("output_format", "webp") not in _FORMATS:
            return _invalid("output_format must be webp, jpeg or png")
        job = Job(id=f"job_{uuid.uuid4().hex[:12]}", body=body)
        self.jobs[job.id] = job
        self.ledger.append({**body, "endpoint": EDIT})
        return json_response(200, {"job_id": job.id, "status": "queued", "endpoint": EDIT,
                                   "estimated_time_seconds": 8, "queued_at": "2026-05-30T12:00:00Z"})

    def _edit_status(self, job_id: str, request: httpx2.Request) -> httpx2.Response:
        if (injected := self.take(self.poll_errors, request)) is not None:
            return injected
        job = self.jobs.get(job_id)
        if job is None or "input_image" not in job.body:
            return json_response(404, {"error": "Not Found", "error_code": "NOT_FOUND",
                                       "message": f"job {job_id} not found"})
        job.polls += 1
        if not self.hold and job.polls >= self.polls_to_complete:
            job.done = True
        if not job.done:
            return json_response(200, {"job_id": job.id, "status": "queued" if job.polls == 1 else "processing",
                                       "progress": 0 if job.polls == 1 else 50})
        if self.job_outcome == "failed":
            return json_response(200, {"job_id": job.id, "status": "failed", "error":
                                       self.echoed(self.failure_message), "failure_reason_code": self.failure_code,
                                       "retryable": self.retryable})
        if self.job_outcome == "cancelled":
            return json_response(200, {"job_id": job.id, "status": "cancelled", "error": "cancelled by the user",
                                       "failure_reason_code": "CANCELLED", "retryable": False})
        fmt = job.body.get("output_format", "webp")
        return json_response(200, {
            "job_id": job.id, "status": "completed", "progress": 100,
            "result_url": self.file_url(request, f"{job.id}.{fmt}"), "result_mime_type": _FORMATS[fmt],
            "queue_wait_seconds": 0.4, "inference_time_seconds": 6.1, "total_elapsed_seconds": 6.5,
            "credits_charged": True, "credits_amount": 1, "cost_usd": 0.01,
        })

    def _upload(self, request: httpx2.Request) -> httpx2.Response:
        m = re.search(rb'name="file"; filename="([^"]+)"\r\nContent-Type: ([^\r]+)\r\n\r\n(.*)\r\n--',
                      request.content, re.DOTALL)
        if "multipart/form-data" not in request.headers.get("content-type", "") or not m:
            return json_response(422, {"detail": [{"loc": ["body", "file"], "msg": "field required",
                                                   "type": "value_error.missing"}]})
        filename, mime, data = m.group(1).decode(), m.group(2).decode(), m.group(3)
        name = f"{uuid.uuid4().hex[:8]}-{filename}"
        self.uploads[name] = (data, mime)
        return json_response(200, {"url": self.file_url(request, name, folder="uploads"), "filename": filename,
                                   "content_type": mime, "size_bytes": len(data)})


def _image(fmt: str, width: int, height: int) -> bytes:
    """A result file in the format asked."""
    if fmt == "png":
        return png_bytes(width, height)
    if fmt == "jpeg":
        return jpeg_bytes(width, height)
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(buffer, "WEBP")
    return buffer.getvalue()


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(message: str) -> httpx2.Response:
    return json_response(400, {"error": "Invalid parameters", "error_code": "INVALID_PARAMETERS",
                               "message": message})
