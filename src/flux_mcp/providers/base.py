"""The provider seam: what an adapter declares, what it may do, and what it must return or raise.

An adapter is one class holding only its provider's wire format. It declares its key variable,
base URL, models and capabilities as class attributes; the job runner does the rest (validation
against the declared limits, the journal, waiting, downloads, previews, files, redaction).

The contract, situation by situation (the runner relies on every line of it):

`prepare(req) -> JobRequest`
    Checks the request against the model's documented limits and returns it, possibly completed
    (e.g. a seed chosen when the provider's default seed is not random). Raises `InvalidInput` or
    `UnsupportedOperation` — before any request is sent. It never does I/O.

`submit(req, *, inline=False) -> Submitted` — the one request that creates a paid job; sent once,
never retried, by `ProviderHttp.submit`.
    accepted          `Submitted(native_id)`: the provider's job id, state None (to be polled).
    finished inline   `Submitted(native_id, state=JobState(...))` with a final state: a synchronous
                      provider, or `inline=True` and the provider held the request until the images
                      were ready. Outputs carry `data` (bytes) or `url`.
    refused           raise a `ProviderError` subclass (`AuthFailed`, `InsufficientCredits`,
                      `RateLimited`, `ProviderRejected`) when the answer proves no job was created.
    not sent          raise `ProviderUnavailable` when the request provably never left (connect error);
                      `ProviderHttp.submit` does this.
    outcome unknown   raise `SubmitOutcomeUnknown` when the request may have created a job but no
                      readable answer proves it (timeout after sending, reset, 5xx, no id in a 2xx).
                      The runner reports it and never resends.
    A synchronous provider makes its own id (e.g. a uuid) so `check_prediction` can answer later.

`poll(native_id, submitted_at) -> JobState` — safe to repeat (`ProviderHttp.fetch` retries it).
    Returns the job's state mapped to the shared status words; an unknown status word raises
    `ProviderUnavailable` (never a guess). A transient failure raises `ProviderUnavailable` (the
    runner keeps waiting); any other `ProviderError` (e.g. the key was revoked) stops the wait and
    keeps the job. Providers without a status endpoint keep the default, which raises
    `UnsupportedOperation`.

`upload(data, filename, mime_type) -> str` — puts a file on the provider's storage; returns an
http(s) URL. Raises like `submit` (uploads are free but still sent once).

`find_submitted(models, since, until) -> SubmitLookup` — optional (`finds_submitted`): the provider's own
record of the jobs it created between `since` and `until` (epoch seconds), read-only and free. Asked only
by a replica's reconciler, for a submit whose answer never arrived (its replica stopped meanwhile).
    read              a `SubmitLookup` whose `created_by(req)` gives the provider ids of the jobs in the
                      window whose request is exactly what submitting `req` sends (model and every field;
                      a held submit and a polled one both count), or None: cannot tell (the request as
                      journaled does not pin down what was sent, e.g. a local file uploaded first).
    unreadable        raise a `ProviderError` (`ProviderUnavailable` for a timeout or an answer that cannot
                      be read): the caller then cannot tell for any of them.
    The lookup knows nothing of the journal: which ids are taken, and whether another request could have
    made the same job, are the caller's to decide. Providers without a history keep the default, which
    raises `UnsupportedOperation`.

Text from the provider (error bodies, failure reasons, status messages, output URLs) may echo the
API key. Adapters scrub what they build with `self.http.redactor`; the runner scrubs again where it
enters a record, a result, a progress message or a log line, so a forgotten scrub leaks nothing.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..errors import InvalidInput, UnsupportedOperation
from ..models import Status
from ..request import JobRequest, Kind

if TYPE_CHECKING:
    from ..config import ProviderSettings
    from ..http import ProviderHttp
    from .registry import ProviderSpec


@dataclass(frozen=True)
class Range:
    """An inclusive numeric range, optionally stepped (`multiple_of`)."""

    low: float
    high: float
    multiple_of: int | None = None

    def check(self, field_name: str, value: float, where: str) -> None:
        if not (self.low <= value <= self.high):
            raise InvalidInput(
                f"{field_name}={value:g} is out of range for {where}: allowed {self.describe()}."
            )
        if self.multiple_of and int(value) % self.multiple_of:
            raise InvalidInput(
                f"{field_name}={value:g} is not allowed for {where}: it must be a multiple of "
                f"{self.multiple_of} between {self.low:g} and {self.high:g} "
                f"(e.g. {int(value) // self.multiple_of * self.multiple_of or self.multiple_of})."
            )

    def describe(self) -> str:
        text = f"{self.low:g} to {self.high:g}"
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")

    def contains(self, value: float) -> bool:
        """Whether `check` would accept `value`."""
        return self.low <= value <= self.high and not (self.multiple_of and int(value) % self.multiple_of)


@dataclass(frozen=True)
class ModelInfo:
    """One model a provider offers, with the limits the service checks before any paid request."""

    id: str
    kinds: frozenset[Kind]
    description: str
    size: Range | None = Range(256, 2048)
    steps: Range | None = None
    guidance: Range | None = None
    max_images: int = 1
    requires_image: bool = False
    price_usd: float | None = None
    """Documented price per image, reported as cost when the provider gives none."""
    answers_inline: bool = False
    """The provider documents a mode where the submit request itself is answered with the finished
    images (Atlas Cloud's `enable_sync_mode` + `enable_base64_output`): one request instead of three."""
    canonical: str | None = None
    """The FLUX model this is, by its provider-independent name (`catalog.CANONICAL`), e.g. `flux-dev`;
    None for a variant only this provider has. `model` accepts it in place of `id`."""
    typical_seconds: float | None = None
    """Documented typical seconds from submit to finished images: where polling starts until the journal
    has learned the model's own durations (None: undocumented)."""
    exact_size: bool = True
    """width/height are rendered as given (within `size`); False: they only choose an aspect ratio (or the
    input's size is kept) and the provider sets the pixels."""
    render_step: int = 16
    """FLUX renders sides in multiples of 16 (8x latent, 2x2 patches); other sizes are rounded by the
    provider, silently. Exact sizes are planned on this step (and `size.multiple_of`)."""
    key_background: frozenset[Kind] = frozenset({"generate"})
    """The kinds for which the model follows a flat key-background prompt well enough to matte
    (`transparent`): any FLUX text-to-image model; for edits only instruction models (Kontext),
    not image-to-image, which keeps the input's background."""

    def takes_size(self, width: int, height: int) -> bool:
        """Whether `prepare` accepts this width and height for the model."""
        return self.size is None or (self.size.contains(width) and self.size.contains(height))


ImageRequest = JobRequest
"""The request an adapter receives: a `JobRequest` whose provider, model and (for edits) input image
(an http(s) URL or a data: URI the provider accepts) the service has resolved."""


@dataclass
class OutputRef:
    """A finished image as the provider gave it: a URL, or the bytes themselves."""

    url: str | None = None
    data: bytes | None = None
    mime_type: str | None = None


@dataclass
class JobState:
    """A provider's view of a job, mapped to the shared status words."""

    status: Status
    outputs: list[OutputRef] = field(default_factory=list)
    error: str | None = None
    error_code: str | None = None
    message: str | None = None
    """The provider's own progress text while pending (queue position, phase), shown in progress messages."""
    cost_usd: float | None = None
    """What the job cost, as the provider reported it (None: it reported nothing)."""
    cost_estimated: bool = False
    """`cost_usd` is partly the documented price (e.g. one of several calls came without its cost)."""
    remaining_credits: float | None = None


@dataclass
class Submitted:
    """The answer to a submit: the provider's job id, and its state when the answer already has it."""

    native_id: str
    state: JobState | None = None
    submitted_at: float = field(default_factory=time.time)


class SubmitLookup(Protocol):
    """What a provider's history showed for a time window (`Provider.find_submitted`)."""

    def created_by(self, req: ImageRequest) -> list[str] | None:
        """The provider ids of the window's jobs whose request is exactly what submitting `req` sends (none,
        one, or several identical ones); None when that cannot be told for `req`."""
        ...


class Provider:
    """Base class of every adapter. Subclasses set the class attributes and override what they can do."""

    spec: ClassVar[ProviderSpec]
    """The provider's entry in the registry; a subclass that sets it gets the five attributes below
    from it (a test's planted adapter may set them directly instead)."""
    id: ClassVar[str]
    label: ClassVar[str]
    key_env: ClassVar[str | None]
    base_url_env: ClassVar[str | None]
    default_base_url: ClassVar[str | None]
    extra_env: ClassVar[dict[str, str]] = {}
    """Optional settings: name -> environment variable."""
    models: ClassVar[tuple[ModelInfo, ...]]
    default_model: ClassVar[str]
    default_edit_model: ClassVar[str | None] = None
    can_upload: bool = False
    """Whether upload() works (a subclass may make this a property of its settings)."""
    accepts_data_uri: ClassVar[bool] = False
    """Whether edits may carry the input image inline as a data: URI."""
    allow_unknown_models: ClassVar[bool] = True
    """Pass model ids not in `models` through (with generic limits) rather than refusing them."""
    max_prompt_chars: ClassVar[int] = 4000
    finds_submitted: ClassVar[bool] = False
    """Whether `find_submitted` reads the provider's own history of created jobs."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is not None:
            cls.id, cls.label, cls.key_env = spec.id, spec.label, spec.key_env
            cls.base_url_env, cls.default_base_url, cls.extra_env = spec.base_url_env, spec.default_base_url, \
                spec.extra_env

    def __init__(self, settings: ProviderSettings, http: ProviderHttp):
        self.settings = settings
        self.http = http

    # --- what the service calls -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.settings.base_url.rstrip("/")

    @property
    def can_edit(self) -> bool:
        return any("edit" in m.kinds for m in self.models)

    def model_info(self, model: str | None) -> ModelInfo | None:
        """The model with this provider's own id `model` (None: not in the table)."""
        return next((m for m in self.models if m.id == model), None)

    @classmethod
    def model_for(cls, canonical: str, kind: Kind = "generate") -> ModelInfo | None:
        """This provider's model that serves the canonical FLUX model `canonical` for `kind` (None: not
        served). Where two of its models are the same FLUX model, the first in `models` is used."""
        return next((m for m in cls.models if m.canonical == canonical and kind in m.kinds), None)

    def resolve(self, model: str | None, kind: Kind) -> ModelInfo | None:
        """The model `model` names: this provider's own id, else a canonical name it serves for `kind`
        (an own id that does not do `kind` gives way to the canonical model that does)."""
        own = self.model_info(model)
        if own is not None and kind in own.kinds:
            return own
        return (self.model_for(model, kind) if model else None) or own

    def typical_seconds(self, model: str | None) -> float | None:
        """The documented typical duration of a job of `model` on this provider's own service. None when
        undocumented, and when the base URL points elsewhere (a gateway, a proxy, a local fake): the
        documentation does not describe how fast that answers, so its jobs are learned from scratch."""
        info = self.model_info(model)
        if info is None or info.typical_seconds is None or not self.default_base_url:
            return None
        if self.base_url != self.default_base_url.rstrip("/"):
            return None
        return info.typical_seconds

    def prepare(self, req: ImageRequest) -> ImageRequest:
        """Checks `req` against the model's documented limits; raises InvalidInput before any request.
        A canonical model name becomes this provider's own id (what is sent, journaled and reported)."""
        info = self.resolve(req.model, req.kind)
        if info is not None and info.id != req.model:
            req = req.model_copy(update={"model": info.id})
        where = f"{self.id} model {req.model}"
        if info is None:
            if not self.allow_unknown_models:
                known = ", ".join(_named(m) for m in self.models if req.kind in m.kinds)
                raise InvalidInput(f"Unknown model {req.model!r} for {self.id}. Known {req.kind} models: {known}."
                                   + _served_elsewhere(req.model, req.kind))
            info = ModelInfo(req.model or "", frozenset({"generate", "edit"}), "", max_images=1)
        elif req.kind not in info.kinds:
            other = ", ".join(_named(m) for m in self.models if req.kind in m.kinds) or "none"
            raise InvalidInput(f"{where} does not support {req.kind}; {req.kind} models on {self.id}: {other}."
                               + _served_elsewhere(info.canonical, req.kind))
        if len(req.prompt) > self.max_prompt_chars:
            raise InvalidInput(f"prompt is {len(req.prompt)} characters; {self.id} takes at most {self.max_prompt_chars}.")
        if info.size is not None:
            info.size.check("width", req.width, where)
            info.size.check("height", req.height, where)
        if req.steps is not None:
            if info.steps is None:
                raise InvalidInput(f"steps is not a setting of {where}; leave it out.")
            info.steps.check("steps", req.steps, where)
        if req.guidance_scale is not None:
            if info.guidance is None:
                raise InvalidInput(f"guidance_scale is not a setting of {where}; leave it out.")
            info.guidance.check("guidance_scale", req.guidance_scale, where)
        if req.num_images > self.max_images(info):
            raise InvalidInput(
                f"num_images={req.num_images} is too many for {where}: allowed 1 to {self.max_images(info)}."
            )
        if req.kind == "edit" and not req.image:
            raise InvalidInput("edit_image needs `image`: an http(s) URL, a local file path, or a data: URI.")
        return req

    def answers_inline(self, model: str | None) -> bool:
        """Whether a submit for `model` may be held open until the images come back in its answer."""
        info = self.model_info(model)
        return info is not None and info.answers_inline

    def max_images(self, info: ModelInfo) -> int:
        return info.max_images

    async def refresh_prices(self) -> None:
        """Reads the provider's own price list where it publishes one (see `listed_price`); a no-op here."""

    def listed_price(self, model: str | None) -> float | None:
        """The provider's own current price per image of `model`, as last read by `refresh_prices`."""
        return None

    def price(self, req: ImageRequest) -> float | None:
        info = self.model_info(req.model)
        return info.price_usd * req.num_images if info and info.price_usd is not None else None

    async def submit(self, req: ImageRequest, *, inline: bool = False) -> Submitted:
        """Sends the one request that creates the (paid) job. Never retried. With `inline` (only where
        `answers_inline` allows it; the runner decides) the answer may already hold the final state; the
        adapter falls back to a job id when the provider answers early anyway."""
        raise NotImplementedError

    async def poll(self, native_id: str, submitted_at: float) -> JobState:
        """Asks for the job's state. Safe to repeat."""
        raise UnsupportedOperation(f"{self.id} has no status endpoint; its answers are final when they arrive.")

    async def find_submitted(self, models: Collection[str], since: float, until: float) -> SubmitLookup:
        """Reads which jobs of `models` the provider created between `since` and `until` (epoch seconds), to
        find the job a submit made when its answer never arrived. Read-only and free; never creates a job."""
        raise UnsupportedOperation(f"{self.id} has no history of created jobs to look in.")

    def upload_hint(self) -> str | None:
        """What to set so that this provider can upload, when settings (not the API) are what is missing."""
        return None

    async def upload(self, data: bytes, filename: str, mime_type: str) -> str:
        """Puts a file on the provider's storage and returns its URL."""
        raise UnsupportedOperation(f"{self.id} has no upload API.")

    def describe(self) -> dict[str, object]:
        """What `flux-mcp providers` and the flux://providers resource show."""
        return {
            "id": self.id,
            "label": self.label,
            "configured": self.configured,
            "key_variable": self.key_env,
            "base_url": self.settings.base_url,
            "default_model": self.default_model,
            "default_edit_model": self.default_edit_model,
            "capabilities": {
                "generate": True,
                "edit": self.can_edit,
                "upload": self.can_upload,
                "local_image_input": "upload" if self.can_upload else ("inline" if self.accepts_data_uri else "url only"),
            },
            "models": [
                {
                    "id": m.id,
                    "canonical": m.canonical,
                    "kinds": sorted(m.kinds),
                    "description": m.description,
                    "size": m.size.describe() if m.size else None,
                    "steps": m.steps.describe() if m.steps else None,
                    "guidance_scale": m.guidance.describe() if m.guidance else None,
                    "max_images": self.max_images(m),
                    "price_usd": m.price_usd,
                    "typical_seconds": m.typical_seconds,
                }
                for m in self.models
            ],
        }

    @property
    def configured(self) -> bool:
        return self.key_env is None or self.settings.api_key is not None

    def key(self) -> str:
        """The API key's value, for building request headers only."""
        assert self.settings.api_key is not None, "service checks `configured` first"
        return self.settings.api_key.get_secret_value()


def _named(model: ModelInfo) -> str:
    """A model as listed in a refusal: its id, with its canonical name when that differs."""
    return f"{model.id} ({model.canonical})" if model.canonical and model.canonical != model.id else model.id


def _served_elsewhere(canonical: str | None, kind: Kind) -> str:
    """' flux-dev (edit) is served by: segmind, ...' for a canonical name other providers serve."""
    from .catalog import serving

    others = serving(canonical, kind) if canonical else []
    return f" {canonical} ({kind}) is served by: {', '.join(others)}." if others else ""
