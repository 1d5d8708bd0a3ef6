"""flux-mcp: an MCP server for FLUX image generation and editing through five cloud providers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flux-image-mcp")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
