"""One case object per real provider: what the contract suite needs to know to run it through the same checks.

A provider joins the contract by adding one `Case` to `CASES`: how to make its fake, its variables,
the requests that create a job and ask about one, the errors its documentation lists (with what the
server must say to each), the arguments it must refuse before sending anything, and what it can do.
Where a provider lacks something a check needs (a status endpoint, an operation it cannot do), the
check is skipped with that reason; where a check fails because of a known bug, `known_bugs` says so
and the check is expected to fail (strictly: it is noticed when the bug is fixed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.conftest import ATLAS_KEY
from tests.fakes import appypie
from tests.fakes.acedatacloud import AceDataFake, envelope
from tests.fakes.appypie import AppyPieFake, rate_limited
from tests.fakes.atlascloud import FORBIDDEN as ATLAS_FORBIDDEN
from tests.fakes.atlascloud import AtlasFake
from tests.fakes.base import FakeBase
from tests.fakes.imagepipeline import FORBIDDEN as IP_FORBIDDEN
from tests.fakes.imagepipeline import ImagePipelineFake
from tests.fakes.segmind import HTML_405, SegmindFake

HTML_500 = "<html><body>Internal Server Error</body></html>"
HTML = {"content-type": "text/html"}


@dataclass(frozen=True)
class DocumentedError:
    """An error answer the provider's documentation lists, and what the tool result must say to it."""

    status: int
    body: Any
    says: str
    headers: Mapping[str, str] = field(default_factory=dict)
    label: str = ""

    @property
    def id(self) -> str:
        return f"{self.status}-{self.label}" if self.label else str(self.status)

    def entry(self) -> tuple[int, Any, dict[str, str]]:
        return self.status, self.body, dict(self.headers)


def err(
    status: int, body: Any, says: str, headers: Mapping[str, str] | None = None, label: str = ""
) -> DocumentedError:
    return DocumentedError(status, body, says, headers or {}, label)


@dataclass(frozen=True)
class Case:
    """A provider as the contract suite sees it."""

    id: str
    label: str
    """The provider's name as the tool texts spell it."""
    make_fake: Callable[[str], FakeBase]
    """A fake of the provider that accepts the given key."""
    key_var: str
    base_var: str
    key: str
    """A canary key: neither it nor any 12-character piece of it may surface anywhere."""
    wrong_key: str
    """Another canary, configured where the provider expects `key`."""
    submit: str
    """The request that creates a (paid) job, as the fake logs it ("METHOD /path", a prefix)."""
    status_check: str | None
    """The request that asks about a job; None: the API answers synchronously and has none."""
    one_call_per_image: bool
    """Several images are several paid calls (else one call makes them all)."""
    refused_says: str
    """What a tool result says when the provider refuses the configured key."""
    wrong_key_says: str
    """The provider's own words refusing a wrong key, passed on in the tool result."""
    fail: Callable[[Any], None]
    """Makes the fake's next job fail with a reason."""
    fails_with: str
    """That reason, as the tool result's error must carry it."""
    errors: tuple[DocumentedError, ...]
    out_of_range: tuple[tuple[dict[str, Any], str], ...]
    """Arguments (size, num_images, steps, ...) refused before any request, and the refusal's words."""
    can_edit: bool
    can_upload: bool
    env: Mapping[str, str] = field(default_factory=dict)
    """Further settings every check uses."""
    polled_env: Mapping[str, str] = field(default_factory=dict)
    """Settings that make every job go through the status endpoint (for the checks about it)."""
    polled: Callable[[Any], None] | None = None
    """Makes the fake answer every submit with a job to poll, where it does not by default."""
    pending: Callable[[Any], None] | None = None
    """Makes the fake keep jobs running until `fake.finish(native_id)`."""
    url_answer: Callable[[Any], None] | None = None
    """Makes the fake answer with result URLs where it does not by default."""
    busy_body: Any = None
    """A status-check error body in the provider's shape (for 503/429 answers)."""
    error_args: Mapping[str, Any] = field(default_factory=dict)
    """Arguments of the call that meets each documented error."""
    upload_hint: str | None = None
    """What the refusal of an upload says to set, where settings (not the API) are what is missing."""
    known_bugs: Mapping[str, str] = field(default_factory=dict)
    """Check name -> the bug in the server that makes it fail for this provider today."""

    @property
    def base_url(self) -> str:
        return f"http://{self.id}.test"

    def environment(self, *, key: str | None = "", polled: bool = False) -> dict[str, str]:
        """The settings of a check: the case's key (or `key`; None: no key), its base URL and its extras."""
        env = {self.base_var: self.base_url, **self.env, **(self.polled_env if polled else {})}
        if key is not None:
            env[self.key_var] = key or self.key
        return env

    def __str__(self) -> str:
        return self.id


def _hold(fake: Any) -> None:
    fake.hold = True


def _ip_pending(fake: ImagePipelineFake) -> None:
    fake.answer, fake.hold = "pending", True


ATLAS = Case(
    id="atlascloud",
    label="Atlas Cloud",
    make_fake=lambda key: AtlasFake(key=key),
    key_var="ATLASCLOUD_API_KEY",
    base_var="ATLASCLOUD_BASE_URL",
    key=ATLAS_KEY,
    wrong_key="atlas-wrongkey-2c8d4f6a0b1e3957d9c1",
    submit="POST /api/v1/model/generateImage",
    status_check="GET /api/v1/model/prediction/",
    one_call_per_image=False,
    refused_says="refused the API key in ATLASCLOUD_API_KEY",
    wrong_key_says="invalid or expired API key",
    fail=lambda fake: setattr(fake, "outcome", "fail"),
    fails_with="NSFW content detected in prompt",
    polled_env={"ATLASCLOUD_SYNC_MODE": "off"},
    pending=_hold,
    busy_body={"code": 503, "message": "service busy"},
    can_edit=True,
    can_upload=True,
    errors=(
        err(401, {"code": 401, "message": "invalid api key"}, "refused the API key in ATLASCLOUD_API_KEY"),
        err(
            402, {"code": 402, "message": "insufficient balance"}, "balance is insufficient", label="balance"
        ),
        err(402, {"code": 402, "message": "payment required"}, "insufficient balance", label="plain"),
        err(
            400,
            {"code": 400, "message": "Insufficient balance, please top up"},
            "Top up at atlascloud.ai",
            label="balance",
        ),
        err(403, ATLAS_FORBIDDEN, "denied access (HTTP 403"),
        err(
            422,
            {"code": 422, "message": "size is not supported"},
            "rejected the parameters (HTTP 422: size is not supported)",
        ),
        err(
            429, {"code": 429, "message": "too many requests"}, "Try again in 7 seconds", {"retry-after": "7"}
        ),
        err(500, HTML_500, "may or may not have started the job", HTML, label="html"),
        err(503, {"code": 503, "message": "service unavailable"}, "did not resend it"),
    ),
    out_of_range=(
        (
            {"width": 4096},
            (
                "width=4096 is out of range for atlascloud model black-forest-labs/flux-schnell: "
                "allowed 256 to 1536"
            ),
        ),
        # Sizes below the minimum or off the model's step are delivered exactly (tests/test_assets_sizes.py).
        ({"height": 2000}, "height=2000 is out of range"),
        (
            {"num_images": 6},
            ("num_images=6 is too many for atlascloud model black-forest-labs/flux-schnell: allowed 1 to 4"),
        ),
        ({"steps": 8}, "steps is not a setting of atlascloud model black-forest-labs/flux-schnell"),
        (
            {"model": "black-forest-labs/flux-dev", "steps": 60},
            "steps=60 is out of range for atlascloud model black-forest-labs/flux-dev: allowed 1 to 50",
        ),
        ({"model": "black-forest-labs/flux-dev", "guidance_scale": 25}, "guidance_scale=25 is out of range"),
    ),
)

SEGMIND_KEY = "SG_5e9c4a7b1d3f8e20"
"""A canary in Segmind's key format (SG_ and 16 hex digits)."""

SEGMIND = Case(
    id="segmind",
    label="Segmind",
    make_fake=lambda key: SegmindFake(key=key),
    key_var="SEGMIND_API_KEY",
    base_var="SEGMIND_BASE_URL",
    key=SEGMIND_KEY,
    wrong_key="SG_0f1e2d3c4b5a6978",
    env={"SEGMIND_UPLOAD_BASE_URL": "http://segmind.test"},
    submit="POST /v1/",
    status_check=None,
    one_call_per_image=True,
    refused_says="refused the API key in SEGMIND_API_KEY",
    wrong_key_says="may have expired",
    fail=lambda fake: setattr(fake, "answer", "json-no-image"),
    fails_with="Segmind answered HTTP 200 without an image (Request processed)",
    url_answer=lambda fake: setattr(fake, "answer", "json-image-url"),
    can_edit=True,
    can_upload=True,
    errors=(
        err(
            401,
            {"error": "Missing Authorization or x-api-key in header"},
            "refused the API key in SEGMIND_API_KEY (HTTP 401: Missing Authorization or x-api-key in header)",
            label="missing",
        ),
        err(
            401,
            {"error": "Unauthorized. API key is invalid or may have expired..."},
            "refused the API key in SEGMIND_API_KEY (HTTP 401: Unauthorized. API key is invalid",
            label="invalid",
        ),
        err(
            403,
            {"error": "Model access not permitted for this team"},
            "Segmind does not let this key use model flux-schnell (HTTP 403",
        ),
        err(
            404,
            {"error": "The requested URL does not exist"},
            "Segmind has no endpoint for model flux-schnell (HTTP 404",
        ),
        err(405, HTML_405, "Segmind answered 405 Method Not Allowed (an HTML error page)", HTML),
        err(
            406,
            {"error": "Insufficient credits. Please top up."},
            "not have enough credits (HTTP 406: Insufficient credits. Please top up.). Top up at segmind.com",
            label="credits",
        ),
        err(406, "Not enough credits", "Top up at segmind.com", {"content-type": "text/plain"}, label="text"),
        err(
            406, {"error": "Invalid content type"}, "refused the request's content type", label="content-type"
        ),
        err(406, {"error": "Team spend limit exceeded"}, "the team's spend limit is reached", label="limit"),
        err(
            410, {"error": "This model has been retired"}, "Segmind has retired model flux-schnell (HTTP 410"
        ),
        err(
            400,
            {"error": "Prompt is Mandatory and must be string"},
            "rejected the parameters (HTTP 400: Prompt is Mandatory and must be string); nothing was charged",
        ),
        err(
            500,
            HTML_500,
            "Segmind had a server error (HTTP 500: an HTML error page). Segmind bills only successful "
            "answers",
            HTML,
        ),
        err(429, {"error": "Too many requests"}, "Try again in a minute"),
    ),
    out_of_range=(
        ({"width": 4096}, "width=4096 is out of range for segmind model flux-schnell: allowed 512 to 2048"),
        ({"height": 3000}, "height=3000 is out of range for segmind model flux-schnell: allowed 512 to 2048"),
        # 500 px or 1001 px sides are now rendered larger and cropped; a shape the range cannot hold is not.
        ({"width": 2048, "height": 256}, "2048x256 is out of range for segmind model flux-schnell: its sides "
                                         "must be 512 to 2048, a multiple of 8"),
        ({"steps": 9}, "steps=9 is out of range for segmind model flux-schnell: allowed 1 to 8"),
        ({"num_images": 5}, "num_images=5 is too many for segmind model flux-schnell: allowed 1 to 4"),
        ({"guidance_scale": 3}, "guidance_scale is not a setting of segmind model flux-schnell"),
        ({"model": "flux-dev", "guidance_scale": 12}, "guidance_scale=12 is out of range"),
        ({"model": "flux-pro-ultra"}, "Unknown model 'flux-pro-ultra' for segmind"),
        ({"model": "flux-kontext-pro"}, "does not support generate"),
    ),
)

ACEDATA = Case(
    id="acedatacloud",
    label="AceDataCloud",
    make_fake=lambda key: AceDataFake(token=key),
    key_var="ACEDATACLOUD_API_TOKEN",
    base_var="ACEDATACLOUD_BASE_URL",
    key="acedata-canary-4b8e2f91c6d3a7e05f12",
    wrong_key="acedata-wrongkey-7e1c3a5f9d2b4086c8e0",
    submit="POST /flux/images",
    status_check="POST /flux/tasks",
    one_call_per_image=False,
    refused_says="refused the API token in ACEDATACLOUD_API_TOKEN",
    wrong_key_says="invalid_token",
    fail=lambda fake: setattr(fake, "outcome", "fail"),
    fails_with="The prompt was flagged by content moderation.",
    pending=_hold,
    busy_body=envelope("api_error", "service busy"),
    can_edit=True,
    can_upload=False,
    upload_hint="set ACEDATACLOUD_PLATFORM_TOKEN",
    errors=(
        err(
            401,
            envelope("invalid_token", "invalid token"),
            "refused the API token in ACEDATACLOUD_API_TOKEN",
            label="invalid_token",
        ),
        err(
            401,
            envelope("token_expired", "token expired"),
            "API token in ACEDATACLOUD_API_TOKEN has expired",
            label="token_expired",
        ),
        err(
            400,
            envelope("token_mismatched", "token mismatched"),
            "does not match this API",
            label="token_mismatched",
        ),
        err(400, envelope("no_token", "no token"), "Set ACEDATACLOUD_API_TOKEN", label="no_token"),
        err(400, envelope("disabled", "disabled"), "disabled", label="disabled"),
        err(
            400,
            envelope("api_not_implemented", "not implemented"),
            "does not implement this request",
            label="api_not_implemented",
        ),
        err(
            400,
            envelope("bad_request", "model is invalid."),
            "bad_request: model is invalid.",
            label="bad_request",
        ),
        err(
            400,
            {"success": False, "error": "size is invalid"},
            "rejected the request (HTTP 400: size is invalid)",
            label="bare-error",
        ),
        err(
            403,
            envelope("used_up", "Insufficient balance"),
            "Top up at platform.acedata.cloud",
            label="used_up",
        ),
        err(403, {"detail": "forbidden"}, "balance may be used up", label="no-code"),
        err(404, envelope("no_api", "no api"), "Check ACEDATACLOUD_BASE_URL", label="no_api"),
        err(
            429,
            envelope("too_many_requests", "slow down"),
            "the job was not created. Try again in 7 seconds",
            {"retry-after": "7"},
            label="retry-after",
        ),
        err(429, envelope("too_many_requests", "slow down"), "Try again in a minute", label="no-retry-after"),
        err(
            500,
            envelope("api_error", "fetch failed"),
            "may or may not have started the job",
            label="api_error",
        ),
        err(502, "<html>bad gateway</html>", "may or may not have started the job", HTML, label="html"),
        err(200, envelope("used_up", "Insufficient balance"), "balance is used up", label="used_up"),
    ),
    out_of_range=(
        ({"width": 1500}, "width=1500 is out of range for acedatacloud model flux-dev: allowed 256 to 1440"),
        # 1000 px or 128 px sides are now rendered on the grid and cropped; beyond it they are refused.
        ({"height": 1441}, "height=1441 is out of range for acedatacloud model flux-dev: allowed 256 to 1440"),
        ({"model": "flux-pro", "width": 1440, "height": 128}, "its sides must be 256 to 1440, a multiple of 32"),
        ({"num_images": 5}, "num_images=5 is too many for acedatacloud model flux-dev: allowed 1 to 4"),
        ({"steps": 20}, "steps is not a setting of acedatacloud model flux-dev"),
        ({"guidance_scale": 3.5}, "guidance_scale is not a setting"),
        ({"seed": 7}, "seed is not a setting of acedatacloud"),
        ({"model": "flux-kontext-pro", "width": 8000}, "width=8000 is out of range"),
    ),
)

IMAGEPIPELINE = Case(
    id="imagepipeline",
    label="ImagePipeline",
    make_fake=lambda key: ImagePipelineFake(key=key),
    key_var="IMAGEPIPELINE_API_KEY",
    base_var="IMAGEPIPELINE_BASE_URL",
    key="ip_live_canary-5b8e2d71c04f9a36e1d7",
    wrong_key="ip_live_wrongkey-3a9c1e7b5d0f2846a1c3",
    submit="POST /generate/v3",
    status_check="GET /generate/v3/status/",
    one_call_per_image=False,
    refused_says="refused the API key in IMAGEPIPELINE_API_KEY",
    wrong_key_says="Invalid or missing API key",
    fail=lambda fake: setattr(fake, "outcome", "FAILURE"),
    fails_with="CUDA out of memory on the dedicated server",
    polled=lambda fake: setattr(fake, "answer", "pending"),
    pending=_ip_pending,
    busy_body={"error": "busy", "message": "try later"},
    # Edits and uploads go to ImagePipeline's job API (`/edit/image/v1`, `/upload/image/v1`).
    can_edit=True,
    can_upload=True,
    errors=(
        err(
            401,
            {"error": "Unauthorized", "error_code": "UNAUTHORIZED", "message": "Invalid API key"},
            "refused the API key in IMAGEPIPELINE_API_KEY",
        ),
        err(
            402,
            {
                "error": "Payment Required",
                "error_code": "INSUFFICIENT_BALANCE",
                "message": "Balance is $0.00",
            },
            "Top up at imagepipeline.io",
        ),
        err(
            400,
            {"error": "Bad Request", "error_code": "INSUFFICIENT_BALANCE", "message": "Not enough credit"},
            "INSUFFICIENT_BALANCE: Not enough credit). Top up",
            label="INSUFFICIENT_BALANCE",
        ),
        err(
            400,
            {"error": "Bad Request", "error_code": "INVALID_PARAMETERS", "message": "samples too high"},
            "HTTP 400: INVALID_PARAMETERS: samples too high). Adjust the arguments",
            label="INVALID_PARAMETERS",
        ),
        err(403, IP_FORBIDDEN, "denied access (HTTP 403"),
        err(
            422,
            {"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]},
            "HTTP 422: prompt: field required",
        ),
        err(
            429,
            {"error": "Too Many Requests", "error_code": "RATE_LIMIT_EXCEEDED", "message": "slow down"},
            "Try again in 7 seconds",
            {"retry-after": "7"},
        ),
        err(
            500,
            {"error": "Internal Server Error", "error_code": "INTERNAL_ERROR", "message": "boom"},
            "may or may not have started the job",
        ),
        err(
            503,
            "<html><body>Service Unavailable</body></html>",
            "HTTP 503 (an HTML error page)",
            HTML,
            label="html",
        ),
    ),
    out_of_range=(
        (
            {"width": 2048},
            "width=2048 is out of range for imagepipeline model flux-schnell: allowed 256 to 1536",
        ),
        ({"height": 1600}, "height=1600 is out of range"),  # 128 px is delivered exactly now
        ({"num_images": 5}, "num_images=5 is too many for imagepipeline model flux-schnell: allowed 1 to 4"),
        ({"steps": 60}, "steps=60 is out of range for imagepipeline model flux-schnell: allowed 1 to 50"),
        ({"guidance_scale": 3.5}, "guidance_scale is not a setting of imagepipeline model flux-schnell"),
        (
            {"model": "flux-dev"},
            "Unknown model 'flux-dev' for imagepipeline. Known generate models: flux-schnell",
        ),
    ),
)

APPYPIE = Case(
    id="appypie",
    label="AppyPie",
    make_fake=lambda key: AppyPieFake(key=key),
    key_var="APPYPIE_SUBSCRIPTION_KEY",
    base_var="APPYPIE_BASE_URL",
    key="appypie-canary-5d1e8b3f9a7c2e60b4d8",
    wrong_key="appypie-wrongkey-9b3d5f7a1c2e4068e2a4",
    submit="POST /flux-1-schnell/v1/getData",
    status_check=None,
    one_call_per_image=True,
    refused_says="AppyPie refused the subscription key",
    wrong_key_says="Access denied due to invalid subscription key",
    fail=lambda fake: setattr(fake, "no_output", 1),
    fails_with="AppyPie answered HTTP 200 without an image (Image Getting Created)",
    can_edit=False,
    can_upload=False,
    # Several images are calls in turn: the first error must also stop the ones after it.
    error_args={"num_images": 3},
    errors=(
        err(
            401,
            appypie.AUTH_ERROR,
            "AppyPie refused the subscription key (HTTP 401: Invalid or missing "
            "authentication). Check APPYPIE_SUBSCRIPTION_KEY",
            label="page",
        ),
        err(401, appypie.MISSING_KEY, "Access denied due to missing subscription key", label="gateway"),
        err(
            403,
            appypie.FORBIDDEN,
            "the subscription may not include the Flux Schnell API (HTTP 403: Access "
            "denied for this operation). Check APPYPIE_SUBSCRIPTION_KEY",
            label="page",
        ),
        err(
            403,
            {
                "statusCode": 403,
                "message": "Out of call volume quota. Quota will be replenished in 23:59:59.",
            },
            "call quota is used up",
            {"retry-after": "86400"},
            label="quota",
        ),
        err(
            400,
            appypie.BAD_PARAMS,
            "AppyPie rejected the request (HTTP 400: Invalid request parameters)",
            label="parameters",
        ),
        err(400, appypie.BAD_PROMPT, "HTTP 400: Invalid prompt parameter", label="prompt"),
        err(
            404, appypie.NOT_FOUND, "(Endpoint not found) for /flux-1-schnell/v1/getData. Check APPYPIE_BASE"
        ),
        err(
            429,
            appypie.RATE_LIMIT,
            "AppyPie is rate limiting requests (HTTP 429: Rate limit exceeded, please "
            "retry later); the image was not made. Try again in a minute.",
            label="page",
        ),
        err(
            *rate_limited(60)[:2],
            "Rate limit is exceeded. Try again in 60 seconds.); the image was not made. "
            "Try again in 60 seconds.",
            rate_limited(60)[2],
            label="gateway",
        ),
        err(
            429,
            {"statusCode": 429, "message": "Rate limit is exceeded. Try again in 45 seconds."},
            "the image was not made. Try again in 45 seconds.",
            label="seconds-in-text",
        ),
        err(
            500,
            appypie.SERVER_ERROR,
            "HTTP 500 (An unexpected error occurred, please try again later) to the "
            "submit request. The provider may or may not have started the job",
        ),
        err(
            502,
            "<html><body>Bad Gateway</body></html>",
            "may or may not have started the job; this server did not resend it",
            HTML,
            label="html",
        ),
    ),
    out_of_range=(
        ({"steps": 9}, "steps=9 is out of range for appypie model flux-1-schnell: allowed 1 to 8"),
        ({"width": 4096}, "width=4096 is out of range for appypie model flux-1-schnell: allowed 256 to 2048"),
        ({"height": 2100}, "height=2100 is out of range"),  # 128 px is delivered exactly now
        ({"num_images": 5}, "allowed 1 to 4"),
        ({"guidance_scale": 3.5}, "guidance_scale is not a setting of appypie model flux-1-schnell"),
        ({"model": "flux-dev"}, "Unknown model 'flux-dev' for appypie. Known generate models: flux-1-schn"),
    ),
)

CASES: tuple[Case, ...] = (ATLAS, SEGMIND, ACEDATA, IMAGEPIPELINE, APPYPIE)
"""Every real provider. The placeholder needs no key and sends nothing, so it has no contract to keep."""
