"""The shared result types: what every tool returns, whatever the provider."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["starting", "processing", "succeeded", "failed", "canceled"]
"""`starting` and `processing` are pending; the other three are final."""

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
    mime_type: str | None = Field(default=None, description="e.g. image/png, image/jpeg, image/webp.")
    width: int | None = Field(default=None, description="Width in pixels of the local copy.")
    height: int | None = Field(default=None, description="Height in pixels of the local copy.")


class PredictionResult(BaseModel):
    """The structured result of generate_image, edit_image and check_prediction."""

    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(description="'<provider>:<id>'; pass it to check_prediction at any later time.")
    provider: str = Field(description="Provider id that ran the job.")
    model: str = Field(description="Model that ran the job.")
    status: Status = Field(description="starting/processing (pending), succeeded, failed or canceled.")
    images: list[ImageOutput] = Field(default_factory=list, description="Finished images (empty while pending).")
    error: str | None = Field(default=None, description="Why the job failed, or why images are missing.")
    message: str = Field(default="", description="What to know or do next.")
    placeholder: bool = Field(default=False, description="True: an offline placeholder, not a FLUX image.")
    cost_usd: float | None = Field(default=None, description="Cost in USD when the provider reported or priced it.")
    remaining_credits: float | None = Field(
        default=None, description="Credit left on the account when the provider reported it."
    )
    files: list[str] = Field(default_factory=list, description="Files written by a preset or transparent=true.")
    snippet: str | None = Field(default=None, description="Lines to paste for a preset's files.")


class UploadResult(BaseModel):
    """The structured result of upload_media."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(description="Provider whose storage holds the file.")
    url: str = Field(description="URL to pass as `image` to edit_image (may expire).")
    path: str = Field(description="The local file that was uploaded.")
    mime_type: str = Field(description="Content type of the uploaded file.")
    size_bytes: int = Field(description="Size of the uploaded file.")
    reused: bool = Field(description="True when the same file was uploaded before and its URL reused.")
