"""The provider seam: what an adapter declares and the four things it can do.

An adapter is one class holding only its provider's wire format. It declares its key variable,
base URL, models and capabilities as class attributes; the service does the rest (validation
against the declared limits, the journal, waiting, downloads, previews, files).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..errors import InvalidInput, UnsupportedOperation
from ..models import Status

if TYPE_CHECKING:
    from ..config import ProviderSettings
    from ..http import ProviderHttp
    from .registry import ProviderSpec

Kind = Literal["generate", "edit"]


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


@dataclass
class ImageRequest:
    """A validated generation or edit request, in the server's terms."""

    kind: Kind
    prompt: str
    model: str
    width: int = 1024
    height: int = 1024
    num_images: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    image: str | None = None
    """For edits: an http(s) URL or a data: URI the provider accepts."""
    inline: bool = False
    """Ask for the finished images in the submit's own answer (only where `answers_inline` allows it);
    the service decides, the adapter falls back to a job id when the provider answers early anyway."""


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
    cost_usd: float | None = None
    remaining_credits: float | None = None


@dataclass
class Submitted:
    """The answer to a submit: the provider's job id, and its state when the answer already has it."""

    native_id: str
    state: JobState | None = None
    submitted_at: float = field(default_factory=time.time)


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

    def model_info(self, model: str) -> ModelInfo | None:
        return next((m for m in self.models if m.id == model), None)

    def prepare(self, req: ImageRequest) -> ImageRequest:
        """Checks `req` against the model's documented limits; raises InvalidInput before any request."""
        info = self.model_info(req.model)
        where = f"{self.id} model {req.model}"
        if info is None:
            if not self.allow_unknown_models:
                known = ", ".join(m.id for m in self.models if req.kind in m.kinds)
                raise InvalidInput(f"Unknown model {req.model!r} for {self.id}. Known {req.kind} models: {known}.")
            info = ModelInfo(req.model, frozenset({"generate", "edit"}), "", max_images=1)
        elif req.kind not in info.kinds:
            other = ", ".join(m.id for m in self.models if req.kind in m.kinds) or "none"
            raise InvalidInput(f"{where} does not support {req.kind}; {req.kind} models on {self.id}: {other}.")
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

    def answers_inline(self, model: str) -> bool:
        """Whether a submit for `model` may be held open until the images come back in its answer."""
        info = self.model_info(model)
        return info is not None and info.answers_inline

    def max_images(self, info: ModelInfo) -> int:
        return info.max_images

    def price(self, req: ImageRequest) -> float | None:
        info = self.model_info(req.model)
        return info.price_usd * req.num_images if info and info.price_usd is not None else None

    async def submit(self, req: ImageRequest) -> Submitted:
        """Sends the one request that creates the (paid) job. Never retried. With `req.inline` the
        answer may already hold the final state; without, it normally holds only the job id."""
        raise NotImplementedError

    async def poll(self, native_id: str, submitted_at: float) -> JobState:
        """Asks for the job's state. Safe to repeat."""
        raise UnsupportedOperation(f"{self.id} has no status endpoint; its answers are final when they arrive.")

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
                    "kinds": sorted(m.kinds),
                    "description": m.description,
                    "size": m.size.describe() if m.size else None,
                    "steps": m.steps.describe() if m.steps else None,
                    "guidance_scale": m.guidance.describe() if m.guidance else None,
                    "max_images": self.max_images(m),
                    "price_usd": m.price_usd,
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
