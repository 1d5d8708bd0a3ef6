"""Reading back the provenance flux-mcp writes into its images (prompt, model, provider, seed, ...).

PNG files carry one text chunk per field; JPEG and WebP an XMP packet with `flux:` fields (and an
EXIF description). `read` returns the fields whatever the format, or an empty dict for an image
flux-mcp did not make. `flux-mcp info FILE` and `variation_of` rely on it.
"""

from __future__ import annotations

import html
import io
import re
import warnings
from typing import Any

FIELDS = ("prompt", "provider", "model", "seed", "prediction_id", "kind", "width", "height", "transparent",
          "preset", "software")
"""The fields flux-mcp writes, in the order `flux-mcp info` shows them."""
_XMP_FIELD = re.compile(rb"<flux:([a-z_]+)>(.*?)</flux:\1>", re.DOTALL)


def read(data: bytes) -> dict[str, str]:
    """The provenance fields of an image (empty when it has none). Raises ValueError for non-images."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            im = Image.open(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for bytes it cannot read
            raise ValueError(f"not an image this server reads ({type(exc).__name__})") from None
    with im:
        info: dict[Any, Any] = dict(im.info)
        text = getattr(im, "text", None)  # PNG text chunks (all of them, also after the pixels)
    found: dict[str, str] = {}
    if isinstance(text, dict):
        found.update({k: str(v) for k, v in text.items() if k in FIELDS})
    xmp = info.get("xmp") or info.get("XML:com.adobe.xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode()
    if isinstance(xmp, bytes):
        for key, value in _XMP_FIELD.findall(xmp):
            name = key.decode()
            if name in FIELDS:
                found.setdefault(name, html.unescape(value.decode("utf-8", "replace")))
    if found.get("software") != "flux-mcp" and "prediction_id" not in found:
        return {}
    return {k: found[k] for k in FIELDS if k in found}


def describe(data: bytes) -> dict[str, Any]:
    """What `flux-mcp info` prints: the file's format and size, and its provenance."""
    from PIL import Image

    provenance = read(data)
    with Image.open(io.BytesIO(data)) as im:
        return {"format": im.format, "width": im.width, "height": im.height,
                "alpha": im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info,
                "provenance": provenance}


def xmp_packet(fields: dict[str, str]) -> bytes:
    """An XMP packet holding the fields as `flux:` properties (what `read` finds in WebP and AVIF)."""
    body = "".join(f"<flux:{k}>{html.escape(v, quote=False)}</flux:{k}>" for k, v in fields.items()
                   if re.fullmatch(r"[a-z_]+", k))
    return ('<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description rdf:about="" xmlns:flux="https://github.com/flux-mcp/ns/1.0/">'
            f'{body}</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode()
