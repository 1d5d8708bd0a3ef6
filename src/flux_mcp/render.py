"""Turning a prediction into what the model reads: a short text, previews that fit, resource links."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

from mcp_types import CallToolResult, ImageContent, TextContent

from .assets import result_fields, result_lines
from .config import Settings
from .delivery import before_after
from .images import shown_as_is
from .jobs import Outcome
from .journal import Record
from .media import make_preview
from .models import PENDING, ImageOutput
from .paths import PathPolicy
from .providers.placeholder import NOTE as PLACEHOLDER_NOTE
from .providers.registry import PLACEHOLDER

log = logging.getLogger("flux_mcp.render")
PLACEHOLDER_ID = PLACEHOLDER.id
_TEXT_RESERVE = 40_000
"""Bytes of the result budget kept for text and structured content."""


def next_step(record: Record, settings: Settings, *, joined: bool = False) -> str:
    """The sentence that tells the model what to know or do next (also in structuredContent: some clients
    show the model nothing else)."""
    check = f'call check_prediction with prediction_id="{record.id}"'
    if record.status == "succeeded" and any(i.path for i in record.images) and settings.s3_url:
        step = (f"Download each image from its images[].url (a link valid for {settings.presign_seconds / 60:.0f} "
                f"minutes; {check} for a fresh one) and save it in the project.")
    elif record.status == "succeeded" and any(i.path for i in record.images):
        expiring = any(i.url and not i.url.startswith("data:") for i in record.images)
        step = "Use the local path in code" + ("; provider URLs expire." if expiring else ".")
    elif record.status == "succeeded":
        step = f"The images could not be saved locally; {check} to retry."
    elif record.status in PENDING:
        step = (f"The job keeps running; nothing needs to be resubmitted. {check[0].upper()}{check[1:]} "
                f"(wait_seconds up to {settings.max_wait_seconds:g}) to get the images.")
    elif record.status == "failed":
        step = ("Adjust the prompt or parameters and call the tool again (this is a new, paid job), or try "
                "another provider.")
    elif record.status == "unknown":
        step = ("Whether the provider started this job is unknown and it is never resubmitted: look for it in the "
                f"provider's dashboard before calling the tool again (that is a new, paid job); {check} later: "
                "it shows the images if the provider's answer arrives after all.")
    else:
        step = "The job was canceled; call the tool again to start a new job."
    if is_placeholder(record):
        step += f" {PLACEHOLDER_NOTE}"
    if joined:
        step = (f"This call joined the earlier identical call {record.id}, whose answer never arrived: nothing "
                f"was paid twice. {step}")
    return step


def is_placeholder(record: Record) -> bool:
    return record.provider == PLACEHOLDER_ID


def structured(record: Record, settings: Settings, *, joined: bool = False) -> dict[str, object]:
    """The structuredContent of a prediction: the tool results and the prediction resource say the same."""
    delivered = result_fields(record)
    message = " ".join(filter(None, [delivered.pop("notes", None), next_step(record, settings, joined=joined)]))
    result = record.result().model_copy(update={"message": message, "placeholder": is_placeholder(record),
                                                **delivered})
    return result.model_dump(mode="json")


def prediction_result(outcome: Outcome, paths: PathPolicy, settings: Settings, *, action: str) -> CallToolResult:
    record = outcome.record
    lines: list[str] = []
    who = f"{record.provider} ({record.model})"
    if record.status == "succeeded" and any(i.path for i in record.images):
        n = len(record.images)
        lines.append(f"{action} {n} image{'s' if n != 1 else ''} with {who}. prediction_id: {record.id}")
        for i, img in enumerate(record.images, 1):
            if img.path and settings.s3_url:
                lines.append(f"Image {i}: {img.width}x{img.height}, {img.mime_type}; flux://images/{record.id}/{i - 1}")
                if img.url:
                    lines.append(f"  download URL (expires): {img.url}")
                continue
            if img.path:
                where = paths.display(img.path)
                lines.append(f"Image {i}: {where} ({img.width}x{img.height}, {img.mime_type}; "
                             f"flux://images/{record.id}/{i - 1})")
                if where != img.path:
                    lines.append(f"  absolute path: {img.path}")
            else:
                lines.append(f"Image {i}: not downloaded")
            if img.url and not img.url.startswith("data:"):
                lines.append(f"  provider URL (expires): {img.url}")
        lines.extend(result_lines(record))
        if record.error:
            lines.append(f"Note: {record.error}")
        lines.append(next_step(record, settings, joined=outcome.joined))
    elif record.status == "succeeded":
        lines.append(f"The job {record.id} on {who} finished, but its images could not be saved locally: "
                     f"{record.error}")
        for i, img in enumerate(record.images, 1):
            if img.url:
                lines.append(f"Image {i} URL (expires): {img.url}")
        lines.append(f'Call check_prediction with prediction_id="{record.id}" to retry the download.')
    elif record.status in PENDING:
        waited = f" after {outcome.waited:.0f} s" if outcome.waited >= 1 else ""
        lines.append(f"Still {record.status} on {who}{waited}. prediction_id: {record.id}")
        lines.append(next_step(record, settings, joined=outcome.joined))
    elif record.status == "failed":
        lines.append(f"The job {record.id} on {who} failed: {record.error or 'no reason given'}.")
        lines.append(next_step(record, settings, joined=outcome.joined))
    elif record.status == "unknown":
        lines.append(f"The job {record.id} on {who} is unknown: {record.error or 'no answer to its submit'}")
        lines.append(next_step(record, settings, joined=outcome.joined))
    else:
        lines.append(f"The job {record.id} on {who} was canceled: {record.error or 'no reason given'}.")
    if record.cost_usd is not None and record.cost_usd > 0:
        lines.append(f"Cost: ${record.cost_usd:.4f}{' (estimated from the price table)' if record.cost_estimated else ''}")
    if record.remaining_credits is not None:
        lines.append(f"Remaining credits: {record.remaining_credits:g}")
    if record.request.get("selection_reason"):
        lines.append(f"Provider choice: {record.request['selection_reason']}")
    lines.extend(outcome.notes)

    content: list = [TextContent(type="text", text="\n".join(lines))]
    content.extend(_previews([img for img in record.images if img.path], outcome.kept, settings,
                             outcome.source_image))
    # No resource_link blocks: some clients turn an image link into an image source URL (flux://...) that
    # model APIs refuse; the text names each image's URI instead.
    failed = record.status in ("failed", "canceled")
    return CallToolResult(content=content, structured_content=structured(record, settings, joined=outcome.joined),
                          is_error=failed)


def _budget(count: int, settings: Settings) -> int | None:
    """Bytes each of `count` previews may take (None: full resolution)."""
    if settings.preview == "full":
        return None
    # The budget is for the whole result: base64 adds a third, text and structure need the rest.
    total = max(settings.preview_budget - _TEXT_RESERVE, 20_000)
    return max(total // count, 8_000)


def _fits(image: ImageOutput, data: bytes | None, budget: int | None) -> bool:
    """Whether `data` (the bytes just written at `image.path`) can be shown as it is, judged from what is
    known of them (make_preview applies the same rule after opening the bytes)."""
    return data is not None and shown_as_is(image.mime_type, image.width or 0, image.height or 0, len(data),
                                            budget, data)


def needs_image_work(outcome: Outcome, settings: Settings) -> bool:
    """Whether rendering `outcome` decodes or encodes images (a preview must be shrunk or converted) or
    reads files: work for a thread. Otherwise rendering is a few string operations, done in place."""
    images = [i for i in outcome.record.images if i.path]
    if settings.preview == "off" or not images:
        return False
    if outcome.source_image is not None:
        return True  # a before/after preview is composed
    budget = _budget(len(images), settings)
    return not all(_fits(i, outcome.kept.get(i.path or ""), budget) for i in images)


def _previews(images: list[ImageOutput], kept: dict[str, bytes], settings: Settings,
              source: bytes | None = None) -> list[ImageContent]:
    """One preview per image; an edit's is its input and result side by side (when the input is at hand)."""
    if settings.preview == "off" or not images:
        return []
    out: list[ImageContent] = []
    budget = _budget(len(images), settings)
    for image in images:
        path, data = Path(image.path or ""), kept.get(image.path or "")
        try:
            if source is not None:
                preview, mime = before_after(source, path.read_bytes() if data is None else data, budget)
            elif data is not None and _fits(image, data, budget):
                preview, mime = data, str(image.mime_type)  # the image as written: shown as it is
            elif budget is None:
                # Full resolution, except past 8000 px a side, which breaks client sessions.
                original = path.read_bytes() if data is None else data
                preview, mime = make_preview(path, len(original) + 1, original)
            else:
                preview, mime = make_preview(path, budget, data)
        except Exception as exc:  # noqa: BLE001 - a preview is a convenience: never fail the result for it
            log.warning("no preview for %s: %s", path, exc)
            continue
        out.append(ImageContent(type="image", data=base64.b64encode(preview).decode(), mime_type=mime))
    return out


