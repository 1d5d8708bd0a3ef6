"""Images that land in the code: exact sizes, real transparency, asset sets, variations.

The service plans a job's delivery before paying (`plan`): the size the provider is asked for (the
nearest it renders, of the same shape, never below the target), the key background of a transparent
image, the files of a preset and every check that can fail before the submit. The plan is journaled
with the job (`AssetPlan.journaled`), so whichever call finishes the job delivers it the same way:
the keep step hands each image to `delivery.deliver` (crop and resize to the exact size, matte,
cut the set's files) and `write_files` puts the extra files in place. The result lists them
(`result_fields`, `result_lines`).
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import matte, provenance
from .errors import InvalidInput, PathNotAllowed, UnsupportedOperation
from .paths import PathPolicy
from .presets import Preset, presets
from .request import JobRequest

if TYPE_CHECKING:
    from .journal import Record
    from .providers.base import ModelInfo, Provider

DEFAULT_SIZE = (1024, 1024)
"""JobRequest's default width/height: for edits and aspect-ratio models it means "the model's own size"."""
ORIGINAL_INDEX = 1000
"""The image store keeps the unmatted original of image i at index ORIGINAL_INDEX + i."""
_CHECKER_WORDS = re.compile(r"\b(chess\w*|checker\w*|chequer\w*|gingham|plaid|tartan|tiles?)\b", re.IGNORECASE)


@dataclass(frozen=True)
class AssetPlan:
    """How a job's images are delivered, decided before paying."""

    target: tuple[int, int]
    """The exact size delivered."""
    render: tuple[int, int]
    """The size the provider is asked for."""
    prompt: str
    """The prompt as asked (the journal keeps it; the provider gets the completed one)."""
    key: str | None = None
    """The key background of a transparent image (matte.KEYS)."""
    preset: str | None = None
    folder: str | None = None
    """Where a preset's files go (absolute), checked before paying."""
    checkers: bool = False
    """The prompt asks for a checked pattern: the fake-transparency check would flag the subject itself."""

    def journaled(self) -> dict[str, object]:
        """What the journal keeps: the target size and the prompt as asked (over the ones sent), the plan."""
        return {"width": self.target[0], "height": self.target[1], "prompt": self.prompt,
                "asset": {"render": list(self.render), "key": self.key, "preset": self.preset,
                          "folder": self.folder, "checkers": self.checkers}}

    @classmethod
    def from_journal(cls, request: dict[str, Any]) -> AssetPlan | None:
        raw = request.get("asset")
        if not isinstance(raw, dict):
            return None
        render = raw.get("render") or [request.get("width"), request.get("height")]
        return cls(target=(int(request["width"]), int(request["height"])), render=(int(render[0]), int(render[1])),
                   prompt=str(request.get("prompt", "")), key=raw.get("key"), preset=raw.get("preset"),
                   folder=raw.get("folder"), checkers=bool(raw.get("checkers")))

    @property
    def preset_info(self) -> Preset | None:
        return presets()[self.preset] if self.preset else None


# --- planning (before paying) --------------------------------------------------------------------


def render_size(info: ModelInfo, width: int, height: int) -> tuple[int, int] | None:
    """The size to ask a model that renders pixels for, to deliver exactly width x height: the smallest
    size on its step (`render_step`, `size.multiple_of`) within its range that is not below the target
    on either side and has its shape (up to the step). None: the range cannot hold it."""
    rng = info.size
    if rng is None:
        return width, height
    step = math.lcm(rng.multiple_of or 1, max(info.render_step, 1))
    low, high = math.ceil(rng.low / step) * step, math.floor(rng.high / step) * step
    scale = max(1.0, low / width, low / height)
    w = max(low, math.ceil(width * scale / step - 1e-9) * step)
    h = max(low, math.ceil(height * scale / step - 1e-9) * step)
    return (w, h) if w <= high and h <= high and low <= high else None


def _ratio_request(info: ModelInfo, width: int, height: int) -> tuple[int, int] | None:
    """For models where width/height only pick an aspect ratio: the target, scaled up into the range."""
    rng = info.size
    if rng is None:
        return width, height
    scale = max(1.0, rng.low / min(width, height))
    w, h = round(width * scale), round(height * scale)
    return (w, h) if max(w, h) <= rng.high else None


def plan(req: JobRequest, provider: Provider, configured: Sequence[Provider]) -> AssetPlan | None:
    """The delivery of `req` on `provider` (its model resolved), checked; None when the provider's image is
    delivered as it comes. Raises InvalidInput / UnsupportedOperation naming what would work."""
    info = _info(provider, req.model)
    where = f"{provider.id} model {req.model}"
    preset = presets()[req.preset] if req.preset else None
    target = (req.width, req.height)
    if preset is not None:
        if req.num_images != 1:
            raise InvalidInput(f"preset={preset.id} makes one image and cuts every file of the set from it; "
                               "leave num_images at 1.")
        if target not in (DEFAULT_SIZE, preset.size):
            raise InvalidInput(f"preset={preset.id} sets the size ({preset.size[0]}x{preset.size[1]} and the set's "
                               "own files); leave width and height out.")
        if req.transparent and not preset.alpha:
            raise InvalidInput(f"transparent=true does not suit preset={preset.id} (social sites and JPEG show no "
                               "alpha); leave transparent out, or use preset favicon or app-icon.")
        target = preset.size
    key = None
    if req.transparent:
        if req.kind not in info.key_background:
            raise UnsupportedOperation(_no_key_background(req, provider, where, configured))
        key = matte.choose_key(req.prompt)
    if info.exact_size and info.size is not None:
        render = render_size(info, *target)
        exact = render != target
    else:
        render = _ratio_request(info, *target)
        exact = target != DEFAULT_SIZE
    if render is None:
        raise InvalidInput(_beyond(req, info, where, target, configured))
    if not (exact or key or preset):
        return None
    return AssetPlan(target=target, render=render, prompt=req.prompt, key=key,
                     preset=preset.id if preset else None, checkers=bool(_CHECKER_WORDS.search(req.prompt)))


def sent(req: JobRequest, asset: AssetPlan) -> JobRequest:
    """The request the provider gets: the render size, and the prompt completed for the preset and key."""
    prompt = req.prompt
    preset = asset.preset_info
    if preset is not None and req.kind == "generate":
        prompt = f"{prompt}, {preset.hint}"
    if asset.key:
        prompt = matte.key_prompt(prompt, asset.key, edit=req.kind == "edit")
    return req.model_copy(update={"width": asset.render[0], "height": asset.render[1], "prompt": prompt})


def _info(provider: Provider, model: str | None) -> ModelInfo:
    from .providers.base import ModelInfo

    return provider.model_info(model) or ModelInfo(model or "", frozenset({"generate", "edit"}), "", max_images=1)


def _alternatives(configured: Iterable[Provider], kind: str, fits: Any) -> list[str]:
    """'provider model' of every configured model of `kind` that `fits` (not the offline placeholder's)."""
    return [f"{p.id} {m.id}" for p in configured if p.id != "placeholder" for m in p.models
            if kind in m.kinds and fits(m)]


def _beyond(req: JobRequest, info: ModelInfo, where: str, target: tuple[int, int],
            configured: Sequence[Provider]) -> str:
    rng = info.size
    assert rng is not None
    w, h = target
    if max(w, h) > rng.high:
        name, value = ("width", w) if w > rng.high else ("height", h)
        text = f"{name}={value} is out of range for {where}: allowed {rng.describe()}."
    else:
        text = (f"{w}x{h} is out of range for {where}: its sides must be {rng.describe()}, and this shape "
                "cannot reach the minimum without passing the maximum.")

    def fits(m: ModelInfo) -> bool:
        return (render_size(m, w, h) if m.exact_size and m.size else _ratio_request(m, w, h)) is not None

    alternatives = _alternatives(configured, req.kind, fits)
    if alternatives:
        return text + f" Configured models that deliver {w}x{h}: {', '.join(alternatives)} (pass provider and model)."
    return text + f" No configured provider renders {w}x{h}; ask for a smaller size."


def _no_key_background(req: JobRequest, provider: Provider, where: str, configured: Sequence[Provider]) -> str:
    why = ("edits by image-to-image, which keeps the input's background" if req.kind == "edit" else
           "does not paint a flat key background reliably")
    alternatives = _alternatives(configured, req.kind, lambda m: req.kind in m.key_background)
    then = (f"Models that can: {', '.join(alternatives)} (pass provider and model)." if alternatives else
            "No configured provider can.")
    return (f"transparent=true needs a model that paints the subject on a flat key colour when asked; {where} "
            f"{why}. {then}")


def preset_folder(paths: PathPolicy, save_to: str | None, asset: AssetPlan, overwrite: bool) -> AssetPlan:
    """Checks, before paying, the folder a preset writes its files into; returns the plan with it."""
    preset = asset.preset_info
    assert preset is not None
    if not save_to or not save_to.strip():
        raise InvalidInput(f"preset={preset.id} writes {len(preset.files)} file(s) into a folder: pass save_to, "
                           "e.g. 'public/'.")
    raw = save_to.strip()
    absolute = paths.absolute(raw)
    as_folder = raw.endswith(("/", "\\")) or absolute.is_dir()
    if not as_folder and (absolute.exists() or Path(raw).suffix):
        raise InvalidInput(f"preset={preset.id} writes a set of files ({preset.main}, ...), so save_to must be a "
                           f"folder, not the file {raw!r}: e.g. {_parent_of(raw)!r} (end it with / to mean a "
                           "folder).")
    folder = paths.check_write(str(Path(raw) / "x.png")).parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise PathNotAllowed(f"save_to cannot be written: {paths.display(probe)} is a file, not a folder.")
    taken = []
    for f in preset.files:
        target = paths.check_write(str(folder / f.name))
        if target.exists() and (not target.is_file() or not overwrite):
            taken.append(paths.display(target))
    if taken:
        more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
        raise PathNotAllowed(f"{', '.join(taken[:3])}{more} already exist. Pass overwrite=true to replace the "
                             f"{preset.id} set, or choose another folder.")
    return AssetPlan(asset.target, asset.render, asset.prompt, asset.key, asset.preset, str(folder), asset.checkers)


def _parent_of(raw: str) -> str:
    parent = str(Path(raw).parent)
    return "./" if parent in ("", ".") else parent + "/"


def unmatted_path(target: Path) -> Path:
    """Where the unmatted original of a transparent image goes: beside it."""
    return target.with_name(f"{target.stem}.unmatted.png")


def check_targets(targets: Sequence[Path], asset: AssetPlan, paths: PathPolicy, overwrite: bool,
                  free_names: bool) -> None:
    """The save_to files of a transparent image: a format with alpha, and room for the unmatted original."""
    if not asset.key:
        return
    for target in targets:
        if target.suffix.lower() not in (".png", ".webp"):
            raise InvalidInput(f"transparent=true needs a format with alpha: save_to {target.name!r} would be "
                               "JPEG; use .png or .webp.")
        beside = unmatted_path(target)
        if beside.exists() and not overwrite and not free_names:
            raise PathNotAllowed(f"{paths.display(beside)} (the unmatted original's place) already exists. Pass "
                                 "overwrite=true, or choose another save_to.")


def check_source(asset: AssetPlan | None, source: bytes | None, shown: str) -> None:
    """An edit into a square set (favicon, app-icon) needs a square input image."""
    preset = asset.preset_info if asset else None
    if preset is None or not preset.square or source is None:
        return
    from .images import inspect_image

    info = inspect_image(source)
    if abs(info.width - info.height) > max(2, 0.01 * max(info.width, info.height)):
        raise InvalidInput(f"preset={preset.id} needs a square image, but {shown} is {info.width}x{info.height}. "
                           f"Crop it square first, or make a new one: generate_image with preset={preset.id!r}.")


# --- variations ------------------------------------------------------------------------------------


def variation(req: JobRequest, paths: PathPolicy) -> JobRequest:
    """`variation_of`: the request with the file's prompt (plus `req.prompt` where it adds to it), model,
    provider and size, and a new seed. Explicit provider/model/size/seed in `req` win."""
    assert req.variation_of is not None
    resolved, data = paths.read_bytes(req.variation_of)
    shown = paths.display(resolved)
    try:
        found = provenance.read(data)
    except ValueError as exc:
        raise InvalidInput(f"variation_of: {shown} is {exc}.") from None
    if not found.get("prompt"):
        raise InvalidInput(f"variation_of: {shown} carries no flux-mcp provenance (prompt, model, provider), so "
                           "there is nothing to vary. Describe it in `prompt` instead, or change it with "
                           "edit_image.")
    if found.get("kind") == "edit":
        raise InvalidInput(f"variation_of: {shown} was made by edit_image from another image; call edit_image "
                           "on that image again for another version.")
    prompt = found["prompt"]
    extra = req.prompt.strip()
    if extra and extra.lower() not in prompt.lower():
        prompt = f"{prompt}. {extra}"
    if len(prompt) > 4000:
        raise InvalidInput(f"variation_of: the file's prompt plus `prompt` is {len(prompt)} characters; at most "
                           "4000. Shorten `prompt`.")
    provider = req.provider or found.get("provider")
    same = provider == found.get("provider")
    update: dict[str, Any] = {"prompt": prompt, "provider": provider,
                              "model": req.model or (found.get("model") if same else None),
                              "transparent": req.transparent or found.get("transparent") == "true"}
    if (req.width, req.height) == DEFAULT_SIZE and found.get("width", "").isdigit() and \
            found.get("height", "").isdigit():
        update.update(width=int(found["width"]), height=int(found["height"]))
    if req.seed is None:
        old = found.get("seed", "")
        seed = random.randrange(2**31)
        while str(seed) == old:
            seed = random.randrange(2**31)
        update["seed"] = seed
    return req.model_copy(update={**update, "variation_of": shown})


def provenance_fields(request: dict[str, Any], kind: str) -> dict[str, str]:
    """Provenance written beside prompt/model/provider/seed: what a variation reuses."""
    out = {"kind": kind, "width": str(request.get("width")), "height": str(request.get("height"))}
    if request.get("transparent"):
        out["transparent"] = "true"
    if request.get("preset"):
        out["preset"] = str(request["preset"])
    return out


def source_of(request: dict[str, Any], paths: PathPolicy) -> bytes | None:
    """The input image of a journaled edit, when it is a local file still readable (for before/after)."""
    image = request.get("image")
    if not isinstance(image, str) or image.startswith(("http://", "https://", "data:")):
        return None
    try:
        return paths.read_bytes(image)[1]
    except Exception:  # noqa: BLE001 - a preview is a convenience: gone or moved means no "before"
        return None


# --- the result -------------------------------------------------------------------------------------


def result_fields(record: Record) -> dict[str, Any]:
    """What the structured result adds: the files written, the snippet, and notes in message/error."""
    req = record.request
    files = [str(f) for f in req.get("asset_files") or []]
    notes = [str(n) for n in req.get("asset_notes") or []]
    failures = [str(n) for n in req.get("asset_failures") or []]
    fields: dict[str, Any] = {"files": files, "snippet": req.get("asset_snippet")}
    if failures:
        fields["error"] = "; ".join(filter(None, [record.error, *failures]))
    if notes or failures:
        fields["notes"] = " ".join([*(f"{n[0].upper()}{n[1:]}." for n in notes), *failures])
    return fields


def result_lines(record: Record) -> list[str]:
    """The text lines about the delivery: notes, a failed matte, the files (compactly) and the snippet."""
    req = record.request
    lines = [f"{n[0].upper()}{n[1:]}." for n in req.get("asset_notes") or []]
    lines += [str(f) for f in req.get("asset_failures") or []]
    files = [str(f) for f in req.get("asset_files") or []]
    if files:
        folder = _common_folder(files)
        names = [f[len(folder):] for f in files]
        lines.append(f"Files{f' in {folder}' if folder else ''}: {', '.join(compact(names))}")
    if req.get("asset_snippet"):
        lines.append(f"Paste:\n{req['asset_snippet']}")
    return lines


def _common_folder(files: Sequence[str]) -> str:
    parts = [f.replace("\\", "/").split("/")[:-1] for f in files]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common) + "/" if common else ""


_SEPARATORS = re.compile(r"([/._-])")


def compact(names: Sequence[str]) -> list[str]:
    """File names with one varying part written once: `icon-192.png, icon-512.png` -> `icon-{192,512}.png`."""
    items = [tuple(_SEPARATORS.split(n)) for n in names]
    while True:
        best: tuple[int, list[tuple[str, ...]]] | None = None
        for k in range(max((len(t) for t in items), default=0)):
            groups: dict[tuple[Any, ...], list[tuple[str, ...]]] = defaultdict(list)
            for t in items:
                if len(t) > k and not _SEPARATORS.fullmatch(t[k]):
                    groups[(len(t), t[:k], t[k + 1:])].append(t)
            for group in groups.values():
                if len(group) > 1 and (best is None or len(group) > len(best[1])):
                    best = (k, group)
        if best is None:
            return ["".join(t) for t in items]
        k, group = best
        merged = (*group[0][:k], "{" + ",".join(t[k] for t in group) + "}", *group[0][k + 1:])
        at = items.index(group[0])
        items = [t for t in items if t not in group]
        items.insert(at, merged)
