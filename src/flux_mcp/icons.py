"""The server's and the tools' icons: one small SVG glyph each, as a `data:` URI.

Clients show them beside the server and each tool; no model reads them, but every `tools/list` answer
carries them, inside the same byte bound as the descriptions and schemas. So each icon is a single
path on a 4x4 grid, drawn in the viewer's default colour, percent-encoded rather than base64 (a third
smaller), with single quotes and commas so that only `<`, `>` and the spaces between names need escaping.
A data URI works offline and over stdio, where no URL of ours can be fetched.
"""

from __future__ import annotations

from urllib.parse import quote

from mcp_types import Icon

GLYPHS = {
    "server": "M0,4,2,1l2,3z",  # a mountain, as in a picture
    "generate_image": "M0,4,2,1l2,3zM3,0l.5,1-.5,1-.5-1z",  # the mountain and a spark
    "edit_image": "M0,4V3l3-3,1,1-3,3z",  # a pencil
    "upload_media": "M2,0,0,2h1v2h2V2h1z",  # an arrow up
    "check_prediction": "M0,0h4L0,4h4z",  # an hourglass
    "list_predictions": "M0,0h4v1H0zM0,1.5h4v1H0zM0,3h4v1H0z",  # a list
    "create_upload_link": "M2,0,0,2h1v2h2V2h1zM0,3h1v1H0zM3,3h1v1H3z",  # an arrow up onto a tray
    "create_gallery_link": "M0,0h4v4H0zM.5,3.5h3L2,1.5z",  # a framed picture (the inner path winds the other
    # way round, so it is cut out of the frame)
}
"""Each glyph's SVG path data (4x4 units)."""


def svg_uri(path: str) -> str:
    """A `data:` URI of the glyph drawn by `path`."""
    svg = f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0,0,4,4'><path d='{path}'/></svg>"
    return "data:image/svg+xml," + quote(svg, safe="/:=',.-")


def icons(name: str) -> list[Icon]:
    """The icon list of the server (`"server"`) or of the tool `name`."""
    return [Icon(src=svg_uri(GLYPHS[name]))]  # the URI names its type: no `mimeType` needed
