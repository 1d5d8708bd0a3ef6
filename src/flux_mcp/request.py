"""`JobRequest`: the one description of a generation or edit job.

The tools' parameters are derived from its fields (`tool_parameters`), the CLI's flags too, the
journal stores it (`journaled`), and the adapters receive it once the service has resolved the
provider, the model and the input image. Adding a parameter is one field here plus the adapters
that use it.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import re
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .schema import quiet

Kind = Literal["generate", "edit"]
Preset = Literal["og-image", "twitter-card", "favicon", "app-icon", "hero"]
"""The asset sets of `preset` (their sizes and files: `presets.presets()`)."""
MAX_WAIT_SECONDS = 600.0


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Control characters (C0 but newline and tab, DEL, C1): never part of a prompt a person wrote."""


def _plain_text(value: str) -> str:
    if _CONTROL.search(value):
        bad = sorted({f"U+{ord(c):04X}" for c in _CONTROL.findall(value)})
        raise ValueError(f"must not contain control characters (found {', '.join(bad[:5])}); use plain text")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


class JobRequest(BaseModel):
    """What generate_image / edit_image were asked. `kind` and, for edits, `image` say which job it is."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    kind: Kind = "generate"
    prompt: Annotated[str, Field(min_length=1, max_length=4000, json_schema_extra=quiet("minLength", "maxLength")),
                      AfterValidator(_plain_text)]
    image: str | None = Field(default=None, min_length=1, max_length=20_000_000,
                              json_schema_extra=quiet("minLength", "maxLength"),
                              description="A URL, local path or data: URI.")
    provider: str | None = Field(default=None, max_length=40, json_schema_extra=quiet("maxLength"))
    model: str | None = Field(default=None, max_length=120, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$",
                              json_schema_extra=quiet("maxLength", "pattern"), description="List: flux://providers")
    width: int = Field(default=1024, ge=16, le=8192, json_schema_extra=quiet("minimum", "maximum"),
                       description="Most models take 256-1536, as height.")
    height: int = Field(default=1024, ge=16, le=8192, json_schema_extra=quiet("minimum", "maximum"))
    num_images: int = Field(default=1, ge=1, le=8, json_schema_extra=quiet("minimum", "maximum"))
    seed: int | None = Field(default=None, ge=0, le=2_147_483_647, json_schema_extra=quiet("maximum"))
    steps: int | None = Field(default=None, ge=1, le=100, json_schema_extra=quiet("minimum", "maximum"))
    guidance_scale: float | None = Field(default=None, ge=0, le=50, json_schema_extra=quiet("minimum", "maximum"))
    wait_seconds: float | None = Field(default=None, ge=0, le=MAX_WAIT_SECONDS,
                                       json_schema_extra=quiet("minimum", "maximum"))
    save_to: str | None = Field(default=None, max_length=1024, json_schema_extra=quiet("maxLength"),
                                description="Also save here, in the project: a file (.png/.jpg/.webp) or folder.")
    overwrite: bool = Field(default=False)
    """Replace an existing save_to file."""
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200,
                                        json_schema_extra=quiet("minLength", "maxLength"),
                                        description="Same key, same job: a retry never pays twice.")
    dry_run: bool = Field(default=False, description="Check and estimate; submit nothing.")
    max_cost_usd: float | None = Field(default=None, ge=0, le=10_000, json_schema_extra=quiet("minimum", "maximum"),
                                       description="Refuse if the estimate (USD) is higher.")
    transparent: bool = Field(default=False, description="Real alpha, verified.")
    preset: Preset | None = Field(default=None, description="Files into the save_to folder.")
    variation_of: str | None = Field(default=None, min_length=1, max_length=1024,
                                     json_schema_extra=quiet("minLength", "maxLength"),
                                     description="A flux-mcp image to vary (new seed).")

    def journaled(self) -> dict[str, Any]:
        """The request as the journal keeps it: every field, an inline image shortened to its size (the
        idempotency key has its own column)."""
        data = self.model_dump(exclude={"kind", "provider", "model", "idempotency_key"})
        if self.image and self.image.startswith("data:"):
            data["image"] = f"data: URI ({len(self.image)} chars)"
        return data


_KEYED_APART: set[str] = {"wait_seconds", "idempotency_key", "provider"}
"""Fields a request key leaves out (never mutated: model_dump_json only reads it)."""


def request_key(req: JobRequest) -> str:
    """A digest of what the call asked for: identical calls (how long they wait aside) have the same key. The
    fields in their declared order as JSON, then the provider as the call named it, spelling aside."""
    digest = hashlib.sha256(req.model_dump_json(exclude=_KEYED_APART).encode())
    digest.update(b"\0" + (req.provider or "").strip().lower().encode())
    return digest.hexdigest()


SERVICE_ONLY = frozenset({"kind"})
"""Fields the service sets itself; never a tool parameter."""
EDIT_ONLY = frozenset({"image"})
GENERATE_ONLY = frozenset({"num_images", "variation_of"})


def tool_parameters(kind: Kind, descriptions: Mapping[str, str | None] | None = None) -> list[inspect.Parameter]:
    """The tool parameters of `kind`, derived from the fields (order, types, limits, defaults, text).
    `descriptions` replaces a field's description for this tool (None: no description)."""
    skip = SERVICE_ONLY | (GENERATE_ONLY if kind == "edit" else EDIT_ONLY)
    params: list[inspect.Parameter] = []
    for name, info in JobRequest.model_fields.items():
        if name in skip:
            continue
        required = info.is_required() or (kind == "edit" and name in EDIT_ONLY)
        base: Any = str if kind == "edit" and name in EDIT_ONLY else info.annotation
        text = (descriptions or {}).get(name, info.description)
        annotation = Annotated[base, *info.metadata, Field(description=text, json_schema_extra=info.json_schema_extra)]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=inspect.Parameter.empty if required else info.default))
    return params


CLI_SHORT = {"num_images": "-n"}
"""Short flags of `flux-mcp generate`; every other field is `--field-name`."""
CLI_OWN = frozenset({"prompt", "save_to", "wait_seconds"})
"""Fields the CLI spells its own way (the prompt is positional, `-o PATH`, `--wait`)."""


def add_cli_flags(parser: argparse.ArgumentParser, kind: Kind = "generate") -> list[str]:
    """Adds one flag per parameter of `kind` (types and help from the fields); returns the field names.
    Unset flags are None, so the field's own default applies."""
    names: list[str] = []
    for param in tool_parameters(kind):
        name = param.name
        if name in CLI_OWN:
            continue
        info = JobRequest.model_fields[name]
        flags = [f"--{name.replace('_', '-')}", *([CLI_SHORT[name]] if name in CLI_SHORT else [])]
        helptext = (info.description or "").replace("%", "%%")
        base = _plain_type(info.annotation)
        if typing.get_origin(base) is Literal:
            parser.add_argument(*flags, dest=name, choices=typing.get_args(base), default=None, help=helptext)
        elif base is bool:
            parser.add_argument(*flags, dest=name, action="store_true", default=None, help=helptext)
        else:
            parser.add_argument(*flags, dest=name, type=base, default=None, help=helptext)
        names.append(name)
    return names


def _plain_type(annotation: Any) -> Any:
    """`int | None` -> int: the type a command-line value is parsed as."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation
