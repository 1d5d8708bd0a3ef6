"""The Atlas Cloud fake of the tests, made to keep time: jobs finish at a wall-clock moment.

`TimedAtlasFake` is `tests/fakes/atlascloud.AtlasFake` (same wire protocol, same validation) plus:

* a job whose prompt carries `[duration=SECONDS]` completes that many seconds after its submit
  arrived; any other job is complete at its first status request, or at once when the submit asks
  for sync mode (the zero-latency fake); a sync-mode submit is answered when its job completes;
* model ids starting with `bench/` are accepted, so each job length gets a model of its own to
  learn;
* it records, per job, when it was submitted, when it completed, how many status requests asked
  about it, and when one first saw it done — on `time.monotonic()`, which on Linux is one clock for
  every process, so the bench compares it with its own;
* result files are an image chosen by the bench (format, size, flat colour or photo-like content).

The cluster benchmark also reads, per job, the nonce its prompt carries (`[nonce=...]`: which logical call
submitted it, so submits per call can be counted) and can make the provider slow to answer a submit
(`POST /_bench/config {"submit_delay": [LOW, HIGH]}`: the job is created at once, its answer sent a
uniformly drawn LOW..HIGH seconds later, as a real provider's answer takes time to come back).

The history listing (`GET /api/v1/model/history`) is the test fake's, with each timed job's status on the clock.

Control endpoints (not part of the Atlas API): `GET /_bench/jobs`, `POST /_bench/image`, `POST /_bench/config`.
Run it with `python -m bench.fake --port PORT` (the bench does); it only binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import time
from dataclasses import dataclass, field

import httpx2
from PIL import Image, ImageDraw, ImageFilter
from tests.fakes import atlascloud
from tests.fakes.atlascloud import AtlasFake, Job
from tests.fakes.wire import json_response

_DURATION = re.compile(r"\[duration=([0-9.]+)\]")
_NONCE = re.compile(r"\[nonce=([A-Za-z0-9_-]+)\]")
_MIME = {"png": "image/png", "jpeg": "image/jpeg"}


def synth_image(
    fmt: str = "png", width: int = 64, height: int = 64, content: str = "flat", seed: int = 7
) -> bytes:
    """A deterministic test image. `photo` is photo-like (gradients, shapes, grain): it compresses about
    as well as a real FLUX result (1024² PNG ~1.9 MB, JPEG q92 ~230 kB)."""
    if content == "flat":
        im = Image.new("RGB", (width, height), (200, 40, 40))
    else:
        rng = random.Random(seed)
        g = Image.linear_gradient("L").resize((width, height))
        im = Image.merge("RGB", (g, g.rotate(90), g.transpose(Image.Transpose.FLIP_TOP_BOTTOM)))
        draw = ImageDraw.Draw(im)
        for _ in range(40):
            x, y = rng.randrange(width), rng.randrange(height)
            r = rng.randrange(max(width // 20, 1), max(width // 4, 2))
            draw.ellipse(
                (x - r, y - r, x + r, y + r),
                fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)),
            )
        im = im.filter(ImageFilter.GaussianBlur(width / 200))
        noise = Image.merge("RGB", [Image.effect_noise((width, height), 40) for _ in range(3)])
        im = Image.blend(im, noise, 0.12)
    buf = io.BytesIO()
    if fmt == "jpeg":
        im.save(buf, "JPEG", quality=92)
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Timing:
    model: str
    submitted: float
    complete_at: float | None
    polls: int = 0
    done_seen_at: float | None = None
    nonce: str | None = None
    answered: float | None = None
    """When the submit's answer was sent (the job exists from `submitted` on)."""
    via: str | None = None
    """Who sent the submit, when the caller's base URL names it (`/via/<name>/...`: one replica of a cluster)."""
    poll_log: list[tuple[float, str | None]] = field(default_factory=list)
    """Each status request: when it arrived and who sent it (`via`), when callers name themselves."""


@dataclass
class TimedAtlasFake(AtlasFake):
    hold: bool = True
    """Completion is decided by the clock (or the first status request), never by a poll count."""
    timings: dict[str, Timing] = field(default_factory=dict)
    image: bytes = b""
    image_mime: str = "image/png"
    submit_delay: tuple[float, float] = (0.0, 0.0)
    _created: dict[int, Timing] = field(default_factory=dict)
    """The job each submit request in progress created (by the request object's id)."""

    def __post_init__(self) -> None:
        self.image = synth_image()

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if path.startswith("/via/"):  # a caller that names itself (a cluster's replica): recorded, then served
            _, _, via, rest = (path + "/").split("/", 3)
            request = httpx2.Request(request.method, request.url.copy_with(path="/" + rest.rstrip("/")),
                                     headers=request.headers, content=request.content, extensions={"via": via})
            path = request.url.path
        if path == "/_bench/jobs":
            return json_response(
                200, {"now": time.monotonic(), "jobs": {k: vars(v) for k, v in self.timings.items()}}
            )
        if path == "/_bench/image" and request.method == "POST":
            spec = json.loads(request.content)
            self.image = synth_image(spec["format"], spec["width"], spec["height"], spec["content"])
            self.image_mime = _MIME[spec["format"]]
            return json_response(200, {"bytes": len(self.image), "mime_type": self.image_mime})
        if path == "/_bench/config" and request.method == "POST":
            lo, hi = json.loads(request.content)["submit_delay"]
            self.submit_delay = (float(lo), float(hi))
            return json_response(200, {"submit_delay": list(self.submit_delay)})
        if path == "/api/v1/model/generateImage" and request.method == "POST":
            response = await super().handle(request)
            timing = self._created.pop(id(request), None)
            if timing is None:  # refused: no job
                return response
            lo, hi = self.submit_delay
            if hi > 0:
                import anyio

                await anyio.sleep(random.uniform(lo, hi))  # created; the answer is on its way
            timing.answered = time.monotonic()
            return response
        return await super().handle(request)

    def _submit(self, request: httpx2.Request) -> httpx2.Response:
        arrived = time.monotonic()
        try:
            raw = json.loads(request.content)
        except ValueError:
            raw = {}
        body = (
            {**raw.get("input", {}), **{k: v for k, v in raw.items() if k != "input"}}
            if isinstance(raw, dict)
            else {}
        )
        model = str(body.get("model", ""))
        if model.startswith("bench/"):
            atlascloud.KNOWN_MODELS.add(model)  # this process only: the fake's model list, extended
        response = super()._submit(request)
        if response.status_code == 200:
            payload = response.json()
            job_id = (payload.get("data") or {}).get("id") or payload.get("id")
            m = _DURATION.search(str(body.get("prompt", "")))
            nonce = _NONCE.search(str(body.get("prompt", "")))
            self.timings[job_id] = self._created[id(request)] = Timing(
                model=model, submitted=arrived, complete_at=arrived + float(m.group(1)) if m else None,
                nonce=nonce.group(1) if nonce else None, via=request.extensions.get("via"),
            )
        return response

    def _poll(self, job_id: str, request: httpx2.Request) -> httpx2.Response:
        now = time.monotonic()
        job, timing = self.jobs.get(job_id), self.timings.get(job_id)
        if job is not None and timing is not None:
            timing.polls += 1
            timing.poll_log.append((now, request.extensions.get("via")))
            if timing.complete_at is None:
                timing.complete_at = now  # the zero-latency fake: done when first asked
            job.done = now >= timing.complete_at
            if job.done and timing.done_seen_at is None:
                timing.done_seen_at = now
        return super()._poll(job_id, request)

    async def _sync_wait(self, job: Job) -> None:
        """Sync mode on the clock: the held submit answers when the job completes."""
        import anyio

        timing = self.timings[job.id]
        if timing.complete_at is None:
            timing.complete_at = time.monotonic()  # the zero-latency fake: done as soon as it is asked
        remaining = timing.complete_at - time.monotonic()
        if remaining > 0:
            await anyio.sleep(min(remaining, self.sync_timeout))
        now = time.monotonic()
        job.done = now >= timing.complete_at
        if job.done and timing.done_seen_at is None:
            timing.done_seen_at = now

    def status_word(self, job: Job) -> str:
        """The history's status on the clock: a timed job is completed from its moment on, polled or not."""
        timing = self.timings.get(job.id)
        if not job.done and timing is not None and timing.complete_at is not None \
                and time.monotonic() >= timing.complete_at:
            return "failed" if job.outcome == "fail" else "completed"
        return super().status_word(job)

    def image_bytes(self) -> bytes:
        return self.image

    def _file(self, path: str) -> httpx2.Response:
        if path.startswith("/files/"):
            return httpx2.Response(200, content=self.image, headers={"content-type": self.image_mime})
        return super()._file(path)


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from tests.fakes.wire import AsgiAdapter

    from bench.common import KEY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    fake = TimedAtlasFake(key=KEY)
    uvicorn.run(
        AsgiAdapter(fake),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
