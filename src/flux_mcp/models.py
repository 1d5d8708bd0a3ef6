"""The shared result types: what every tool returns, whatever the provider."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

DETAIL: JsonDict = {"x-detail": True}
"""`json_schema_extra` of a result field that the compact outputSchema leaves out (see schema.compact_output):
the field is still in every structuredContent; the schema lists the ones a model acts on."""

Status = Literal["starting", "processing", "succeeded", "failed", "canceled", "unknown"]
"""`starting` and `processing` are pending; succeeded, failed and canceled are final; `unknown` (shared mode): the
server that sent the paid request stopped before the provider answered, so the job may exist; never resubmitted."""

PENDING: frozenset[str] = frozenset({"starting", "processing"})
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


class ImageOutput(BaseModel):
    """One finished image."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        default=None, description="The provider's URL for the image (expires); null when it gave none."
    )
    path: str | None = Field(
        default=None,
        description="Absolute path of the local copy (in the data folder, or the save_to file when given).",
    )
    mime_type: str | None = Field(default=None, description="e.g. image/png, image/jpeg, image/webp.", json_schema_extra=DETAIL)
    width: int | None = Field(default=None, description="Width in pixels of the local copy.", json_schema_extra=DETAIL)
    height: int | None = Field(default=None, description="Height in pixels of the local copy.", json_schema_extra=DETAIL)


class DryRun(BaseModel):
    """What a dry run checked; nothing was submitted."""

    model_config = ConfigDict(extra="forbid")

    width: int
    height: int
    num_images: int
    save_to: list[str] = Field(default_factory=list, description="Files the images would be written to.")
    allowed: bool = Field(description="False: the real call would be refused now (message says why).")
    confirm: bool = Field(description="True: the real call first asks the user to confirm its cost.")


class PredictionResult(BaseModel):
    """The structured result of generate_image, edit_image and check_prediction."""

    model_config = ConfigDict(extra="forbid")

    prediction_id: str | None = Field(
        description="'<provider>:<id>'; pass it to check_prediction at any later time. null: a dry run.")
    provider: str = Field(description="Provider id that ran the job.", json_schema_extra=DETAIL)
    model: str = Field(description="Model that ran the job.", json_schema_extra=DETAIL)
    status: Status | None = Field(
        description="starting/processing (pending), succeeded, failed or canceled. null: a dry run.")
    images: list[ImageOutput] = Field(default_factory=list, description="Finished images (empty while pending).")
    error: str | None = Field(default=None, description="Why the job failed, or why images are missing.")
    message: str = Field(default="", description="What to know or do next.")
    placeholder: bool = Field(default=False, description="True: an offline placeholder, not a FLUX image.",
                              json_schema_extra=DETAIL)
    selection_reason: str | None = Field(default=None, description="Why this provider served the call.",
                                         json_schema_extra=DETAIL)
    cost_usd: float | None = Field(default=None, description="Cost in USD; null when unpriced.",
                                   json_schema_extra=DETAIL)
    cost_estimated: bool = Field(default=False, description="True: cost_usd is from the price table, not the "
                                                            "provider.", json_schema_extra=DETAIL)
    remaining_credits: float | None = Field(
        default=None, description="Credit left on the account when the provider reported it.",
        json_schema_extra=DETAIL)
    dry_run: DryRun | None = Field(default=None, description="Set by a dry run: what was checked.",
                                   json_schema_extra=DETAIL)
    files: list[str] = Field(default_factory=list, description="Files written by a preset or transparent=true.",
                             json_schema_extra=DETAIL)
    snippet: str | None = Field(default=None, description="Lines to paste for a preset's files.",
                                json_schema_extra=DETAIL)


class UploadResult(BaseModel):
    """The structured result of upload_media."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(description="Provider whose storage holds the file.")
    url: str = Field(description="URL to pass as `image` to edit_image (may expire).")
    path: str = Field(description="The local file that was uploaded.")
    mime_type: str = Field(description="Content type of the uploaded file.", json_schema_extra=DETAIL)
    size_bytes: int = Field(description="Size of the uploaded file.", json_schema_extra=DETAIL)
    reused: bool = Field(description="True when the same file was uploaded before and its URL reused.", json_schema_extra=DETAIL)
