"""A wire-level fake of ImagePipeline's FLUX Schnell `generate/v3` API.

What it reproduces, as the v3 documentation page and third-party code calling it describe it (v3 documents
no errors, so error answers take the shapes the newer job API documents):
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
* Result files are served from the fake's own host (`/files/...`), without a key, like a CDN link.

Not reproduced: `queued_image_urls` (whether URLs appear while PENDING is undocumented), `webhook`,
`direct_link`, `batch_id`/`file_prefix`, the newer job API other than its error shapes.

Knobs (set by tests): `answer`, `success_id`, `polls_to_complete`, `hold`, `outcome` ("ok", "FAILURE",
"FAILED"), `failure_field`, `failure_message`, and the shared ones of `FakeBase` (`submit_errors`,
`poll_errors`, `echo_key`, `revoke()`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx2

from .base import FakeBase, Injected
from .wire import json_response, png_bytes

MAX_SIDE = 1536
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
    jobs: dict[str, Job] = field(default_factory=dict)
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
            return httpx2.Response(200, content=png_bytes(*self.image_size),
                                   headers={"content-type": "image/png"})
        self.headers.append(dict(request.headers))
        if (refused := self.check_key(request)) is not None:
            return refused
        if request.method == "POST" and path == "/generate/v3":
            return self._submit(request)
        m = re.fullmatch(r"/generate/v3/status/([^/]+)", path)
        if request.method == "GET" and m:
            return self._status(m.group(1), request)
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


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(message: str) -> httpx2.Response:
    return json_response(400, {"error": "Invalid parameters", "error_code": "INVALID_PARAMETERS",
                               "message": message})
