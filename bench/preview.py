"""Preview: the inline image of 1024² and 2048² PNG and JPEG results — time, bytes, and the result budget.

Each case is a photo-like image (bench/fake.py `synth_image`: it compresses about like a real FLUX
result). Measured in this process, on flux-mcp's own code:
* `make preview`: `flux_mcp.media.make_preview` with the budget the server gives one image;
* baseline: the least work any fitting preview needs — decode the image once and encode one JPEG
  (q85, at most 1568 px a side), the size vision models downscale to anyway;
* end to end: `generate_image` through an in-memory MCP client against the fake serving that image
  (download, keep, provenance, preview, result), and the whole result's JSON size against the 1 MB
  per-result limit of Claude Desktop (`FLUX_MCP_PREVIEW` default: auto).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
from PIL import Image

from .common import KEY, p50
from .fake import TimedAtlasFake, synth_image

CASES = [("png", 1024), ("jpeg", 1024), ("png", 2048), ("jpeg", 2048)]
RESULT_LIMIT = 1_048_576
"""Claude Desktop's limit for one tool result (about 1 MB)."""


def _baseline(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        rgb = im.convert("RGB") if im.mode != "RGB" else im
        rgb.thumbnail((1568, 1568), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=85)
        return buf.getvalue()


def _budget(settings: Any) -> int:
    """The preview budget the server gives a result with one image (mirrors flux_mcp.render)."""
    from flux_mcp import render

    reserve = getattr(render, "_TEXT_RESERVE", 40_000)
    return max(settings.preview_budget - reserve, 20_000)


async def _end_to_end(
    settings: Any, fake: TimedAtlasFake, repeats: int
) -> tuple[list[float], dict[str, Any]]:
    from mcp import Client

    from flux_mcp.server import build_server

    times: list[float] = []
    last: Any = None
    async with httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle)) as http:
        server = build_server(settings, http_client=http)
        async with Client(server, mode="legacy") as client:
            await client.call_tool("generate_image", {"prompt": "bench preview warm-up"})
            for _ in range(repeats):
                start = time.perf_counter()
                last = await client.call_tool("generate_image", {"prompt": "bench preview"})
                times.append(time.perf_counter() - start)
    assert last is not None and not last.is_error, last
    images = [b for b in last.content if b.type == "image"]
    raw = [base64.b64decode(b.data) for b in images]
    dims = []
    for data in raw:
        with Image.open(io.BytesIO(data)) as im:
            dims.append(f"{im.size[0]}x{im.size[1]} {im.format}")
    result_json = last.model_dump_json(by_alias=True, exclude_none=True)
    return times, {
        "result_bytes": len(result_json.encode()),
        "preview_bytes": sum(len(r) for r in raw),
        "preview_b64_bytes": sum(len(b.data) for b in images),
        "preview_dims": dims,
    }


def run(*, repeats: int, end_to_end: bool = True) -> dict[str, Any]:
    """`end_to_end`: also time `generate_image` with each image (off: only `make_preview` against the baseline)."""
    from flux_mcp.config import Settings
    from flux_mcp.media import make_preview

    for name in ("flux_mcp", "httpx2", "httpx", "mcp"):
        logging.getLogger(name).setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="flux-bench-preview-") as tmp:
        root = Path(tmp)
        (root / "workspace").mkdir()
        for fmt, side in CASES:
            data = synth_image(fmt, side, side, "photo")
            source = root / f"source-{side}.{fmt}"
            source.write_bytes(data)
            settings = Settings.from_env(
                {
                    "FLUX_MCP_HOME": str(root / f"home-{fmt}-{side}"),
                    "ATLASCLOUD_API_KEY": KEY,
                    "ATLASCLOUD_BASE_URL": "http://atlas.bench",
                    "FLUX_MCP_ALLOWED_DIRS": str(root / "workspace"),
                },
                cwd=root / "workspace",
            )
            budget = _budget(settings)
            made, base = [], []
            preview = b""
            for _ in range(repeats):
                start = time.perf_counter()
                preview, _mime = make_preview(source, budget)
                made.append(time.perf_counter() - start)
                start = time.perf_counter()
                _baseline(data)
                base.append(time.perf_counter() - start)
            e2e, sizes = [math.nan], {"result_bytes": 0, "preview_bytes": len(preview), "preview_b64_bytes": 0,
                                      "preview_dims": []}
            if end_to_end:
                fake = TimedAtlasFake(key=KEY)
                fake.image, fake.image_mime = data, f"image/{fmt}"
                e2e, sizes = anyio.run(_end_to_end, settings, fake, max(repeats // 2, 2))
            rows.append(
                {
                    "format": fmt,
                    "side": side,
                    "source_bytes": len(data),
                    "budget_bytes": budget,
                    "preview_p50_s": p50(made),
                    "preview_bytes": len(preview),
                    "baseline_p50_s": p50(base),
                    "ratio": p50(made) / p50(base),
                    "end_to_end_p50_s": p50(e2e),
                    **sizes,
                    "under_budget": sizes["preview_bytes"] <= budget
                    and sizes["result_bytes"] <= RESULT_LIMIT,
                }
            )
    return {
        "rows": rows,
        "result_limit": RESULT_LIMIT,
        "met": all(r["under_budget"] for r in rows),
        "goal": "preview bytes within the server's budget and the whole result under 1 MB, always",
    }
