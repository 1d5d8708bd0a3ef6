"""The `flux-mcp` command: flags -> Settings -> build_server(...).run(...)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .config import Settings
from .errors import ConfigError
from .redact import RedactingFilter, Redactor

log = logging.getLogger("flux_mcp")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"flux-mcp: {exc}", file=sys.stderr)
        return 2
    level = (args.log_level or settings.log_level).upper()
    _configure_logging(level, Redactor(settings.secrets()))
    command = args.command or "serve"
    if command in ("serve", "generate"):
        from .journal import check_journal

        try:
            check_journal(settings.home)  # a data folder that cannot be used: one clear line, before serving
        except ConfigError as exc:
            print(f"flux-mcp: {exc}", file=sys.stderr)
            return 2
    if command == "serve":
        return _serve(settings, getattr(args, "transport", "stdio"), getattr(args, "host", "127.0.0.1"),
                      getattr(args, "port", 8000))
    if command == "providers":
        return _providers(settings, as_json=args.json)
    if command == "generate":
        from .terminal import generate

        return generate(settings, args)
    parser.error(f"unknown command {command}")
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux-mcp",
        description="MCP server for FLUX image generation. With no command it serves MCP over stdio.",
    )
    parser.add_argument("--version", action="version", version=f"flux-mcp {__version__}")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning",
                                                "error"], help="log level (logs go to stderr)")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="serve MCP over stdio, SSE or streamable HTTP")
    serve.add_argument("--transport", choices=["stdio", "sse", "streamable-http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (HTTP transports; default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (HTTP transports; default 8000)")

    gen = sub.add_parser("generate", help="generate images from a terminal (same code path as the tool)")
    gen.add_argument("prompt")
    gen.add_argument("--provider")
    gen.add_argument("--model")
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("-n", "--num-images", type=int, default=1, dest="num_images")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float, dest="guidance_scale")
    gen.add_argument("--wait", type=float, dest="wait_seconds", help="seconds to wait (default 600 here)")
    gen.add_argument("-o", "--output", dest="save_to", help="file or folder to write the image(s) to")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    gen.add_argument("--json", action="store_true", help="print the structured result as JSON")

    prov = sub.add_parser("providers", help="show which providers are configured, their models and capabilities")
    prov.add_argument("--json", action="store_true", help="print as JSON")
    return parser


def _configure_logging(level: str, redactor: Redactor) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactingFilter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpx2", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _serve(settings: Settings, transport: str, host: str, port: int) -> int:
    from .server import build_server
    from .providers import registry

    default = registry.default_provider(settings)
    if transport == "stdio":
        log.info("flux-mcp %s serving stdio; default provider %s; data folder %s", __version__, default,
                 settings.home)
        from .stdio import run_stdio

        run_stdio(build_server(settings))
        return 0
    from .transport import is_loopback, token_problem

    if settings.auth_token is not None and (problem := token_problem(settings.auth_token.get_secret_value())):
        print(f"flux-mcp: refusing to serve {transport}: {problem}", file=sys.stderr)
        return 2
    if not is_loopback(host) and settings.auth_token is None:
        print(f"flux-mcp: refusing to listen on {host} without FLUX_MCP_AUTH_TOKEN; set a token (clients then "
              "send 'Authorization: Bearer <token>') or bind 127.0.0.1.", file=sys.stderr)
        return 2
    from .transport import serve_http

    log.info("flux-mcp %s serving %s on http://%s:%d%s; default provider %s; data folder %s", __version__,
             transport, host, port, "/sse" if transport == "sse" else "/mcp", default, settings.home)
    serve_http(settings, transport, host, port)
    return 0


def _providers(settings: Settings, *, as_json: bool) -> int:
    from .providers import overview

    listing = overview(settings)
    default, rows = listing["default"], listing["providers"]
    if as_json:
        print(json.dumps(listing, indent=2))
        return 0
    print(f"{'provider':<14} {'status':<34} {'default model':<38} capabilities")
    for row in rows:
        if row["configured"]:
            status = "configured" + (" (default)" if row["id"] == default else "")
        else:
            status = f"set {row['key_variable']}"
        caps = ", ".join(k for k, v in row["capabilities"].items() if v is True)
        print(f"{row['id']:<14} {status:<34} {row['default_model']:<38} {caps}")
    print("\nModels:")
    for row in rows:
        for m in row["models"]:
            print(f"  {row['id']:<14} {m['id']:<42} {'/'.join(m['kinds']):<14} {m['description']}")
    return 0
