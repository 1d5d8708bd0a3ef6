"""The `flux-mcp` command: flags -> Settings -> build_server(...).run(...)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, heap
from .config import Settings
from .errors import ConfigError, FluxError
from .redact import RedactingFilter, Redactor
from .request import add_cli_flags

log = logging.getLogger("flux_mcp")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before serving began (or in a terminal command): no traceback
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"flux-mcp: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "allowed_dirs", None):
        folders = (Path(d).expanduser() for d in args.allowed_dirs)
        settings = settings.model_copy(
            update={"allowed_dirs": tuple(p if p.is_absolute() else settings.cwd / p for p in folders)})
    level = (args.log_level or settings.log_level).upper()
    _configure_logging(level, Redactor(settings.secrets()))
    command = args.command or "serve"
    if command in ("serve", "generate", "prune", "spend", "history", "gallery"):
        import anyio

        from .backends import check_backends

        try:
            anyio.run(check_backends, settings)  # a data folder or database that cannot be used: one clear line
        except ConfigError as exc:
            print(f"flux-mcp: {exc}", file=sys.stderr)
            return 2
        if command == "serve" and settings.keep_days is not None:
            _prune(settings, older_than=settings.keep_days, dry_run=False, quiet=True)
    if command == "serve":
        return _serve(settings, getattr(args, "transport", "stdio"), getattr(args, "host", "127.0.0.1"),
                      getattr(args, "port", 8000))
    if command == "providers":
        return _providers(settings, as_json=args.json)
    if command == "doctor":
        return _doctor(settings, as_json=args.json)
    if command == "generate":
        from .terminal import generate

        return generate(settings, args)
    if command == "prune":
        return _prune(settings, older_than=args.older_than, dry_run=args.dry_run)
    if command == "spend":
        return _spend(settings, as_json=args.json)
    if command == "history":
        return _history(settings, args)
    if command == "gallery":
        from .gallery import serve

        return serve(settings, port=args.port, open_browser=not args.no_open)
    if command == "info":
        return _info(args.file, as_json=args.json)
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

    serve = sub.add_parser("serve", help="serve MCP over stdio or streamable HTTP (or the deprecated SSE)")
    serve.add_argument("--transport", choices=["stdio", "sse", "streamable-http"], default="stdio",
                       help="stdio (default) or streamable-http (endpoint /mcp). sse (endpoint /sse) is "
                            "deprecated (HTTP+SSE, replaced by streamable HTTP in protocol 2025-03-26); it "
                            "still works for old clients")
    serve.add_argument("--allowed-dirs", nargs="+", metavar="DIR",
                       help="folders where the tools may read and write files (instead of "
                            "FLUX_MCP_ALLOWED_DIRS)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (HTTP transports; default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (HTTP transports; default 8000)")

    gen = sub.add_parser("generate", help="generate images from a terminal (same code path as the tool)")
    gen.add_argument("prompt")
    gen.set_defaults(job_fields=add_cli_flags(gen, "generate"))  # --provider, --model, --width, -n, ...
    gen.add_argument("--wait", type=float, dest="wait_seconds", help="seconds to wait (default 600 here)")
    gen.add_argument("-o", "--output", dest="save_to",
                     help="file or folder to write the image(s) to, as typed: relative to the current "
                          "directory, any folder you can write")
    gen.add_argument("--json", action="store_true", help="print the structured result as JSON")

    prov = sub.add_parser("providers", help="show which providers are configured, their models and capabilities")
    prov.add_argument("--json", action="store_true", help="print as JSON")

    doctor = sub.add_parser("doctor", help="check each configured provider's key and base URL without paying for "
                                           "a job; exit 1 when one needs fixing")
    doctor.add_argument("--json", action="store_true", help="print as JSON")

    spend = sub.add_parser("spend", help="today's and this month's spend per provider against the budgets (UTC days "
                                         "and calendar months)")
    spend.add_argument("--json", action="store_true", help="print as JSON")
    info = sub.add_parser("info", help="show the provenance flux-mcp wrote into an image file (prompt, model, "
                                       "provider, seed, prediction id)")
    info.add_argument("file", help="an image file")
    info.add_argument("--json", action="store_true", help="print as JSON")

    prune = sub.add_parser("prune", help="remove old images and journal rows from the data folder (never a "
                                         "pending job's, never a save_to copy)")
    prune.add_argument("--older-than", type=float, dest="older_than", metavar="DAYS",
                       help="age in days (default FLUX_MCP_KEEP_DAYS, else 30)")
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")

    hist = sub.add_parser("history", help="the journal, newest first: when, status, provider, cost, prompt, path")
    hist.add_argument("query", nargs="?", default="", help="words the prompt must contain (any case)")
    hist.add_argument("--since", help="only jobs since then: 2d, 3h, today, yesterday, 2025-06-01, ...")
    hist.add_argument("--provider", help="only this provider's jobs")
    hist.add_argument("--status", help="succeeded, failed, canceled, or pending (starting/processing)")
    hist.add_argument("-n", "--limit", type=int, default=50, help="how many (default 50, at most 100)")
    hist.add_argument("--json", action="store_true", help="print the jobs as JSON")

    gal = sub.add_parser("gallery", help="a local web page of every image made, with prompts, costs and paths")
    gal.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    gal.add_argument("--no-open", action="store_true", help="do not open a browser; just print the address")
    return parser


def _history(settings: Settings, args: argparse.Namespace) -> int:
    import shutil

    import anyio

    from . import history
    from .backends import open_journal

    async def run() -> history.Page:
        journal = await open_journal(settings)
        try:
            since = history.parse_since(args.since) if args.since else None
            return await history.page(journal, principal=None, query=args.query, provider=args.provider,
                                      status=args.status, since=since, limit=args.limit)
        finally:
            await journal.close()

    try:
        found = anyio.run(run)
    except FluxError as exc:
        print(f"flux-mcp: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"predictions": [history.full(r) for r in found.records], "more": found.next is not None},
                         indent=2))
        return 0
    print(history.table(found.records, shutil.get_terminal_size((120, 24)).columns))
    if found.next:
        print(f"(more, older jobs match: raise -n, at most {history.MAX_LIMIT}, or narrow with --since)",
              file=sys.stderr)
    return 0


def _prune(settings: Settings, *, older_than: float | None, dry_run: bool, quiet: bool = False) -> int:
    import gc

    import anyio

    from .backends import open_journal, open_store
    from .prune import prune

    days = older_than if older_than is not None else (settings.keep_days or 30.0)
    if days < 0:
        print("flux-mcp: --older-than must be a number of days, 0 or more.", file=sys.stderr)
        return 2

    async def run() -> int:
        journal = await open_journal(settings)
        store = open_store(settings)
        try:
            done = await prune(journal, store, older_than_days=days, dry_run=dry_run)
        finally:
            await journal.close()
            # The bucket's client goes now, while the interpreter is whole: dropped during its exit, obstore's
            # runtime aborted the process now and then (SIGABRT after the work was done).
            del store
            gc.collect()
        verb = "would remove" if dry_run else "removed"
        where = getattr(journal, "where", None) or settings.home
        shared = (f"; {'would release' if dry_run else 'released'} {done.reservations} reservation(s) no job can "
                  f"bill, {verb} {done.upload_urls} upload URL row(s) and {len(done.objects)} upload/gallery "
                  "object(s) past their lifetime") if settings.shared else ""
        if quiet:  # at server start: stdout may be the JSON-RPC channel
            log.info("%s %d prediction(s) and %d image file(s) older than %g days%s", verb, len(done.predictions),
                     len(done.files), days, shared)
            return 0
        for path in [*done.files, *done.objects]:
            print(path)
        print(f"{verb} {len(done.predictions)} prediction(s) and {len(done.files)} image file(s) older than "
              f"{days:g} days from {where}{shared}", file=sys.stderr)
        return 0

    return anyio.run(run)


def _spend(settings: Settings, *, as_json: bool) -> int:
    import anyio

    from .backends import open_journal
    from .money import Money, format_report

    async def run() -> dict[str, Any]:
        journal = await open_journal(settings)
        try:
            return await Money(settings, journal).report()
        finally:
            await journal.close()

    report = anyio.run(run)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0


def _doctor(settings: Settings, *, as_json: bool) -> int:
    import anyio

    from . import doctor

    code, text = anyio.run(lambda: doctor.run(settings, as_json=as_json))
    if settings.oauth is not None:  # the issuer's metadata and keys, read as the server will read them
        from .oauth import check_issuer

        ok, detail = anyio.run(check_issuer, settings.oauth)
        code = code if ok else 1
        if as_json:
            report = json.loads(text)
            report.update(ok=code == 0, oauth={"ok": ok, "detail": detail})
            text = json.dumps(report, indent=2)
        else:
            text += f"\n\n{'oauth issuer':<14} {'OK' if ok else 'UNREACHABLE':<15} {detail}"
    print(text)
    return code


def _info(file: str, *, as_json: bool) -> int:
    from .provenance import describe

    path = Path(file).expanduser()
    try:
        found = describe(path.read_bytes())
    except OSError as exc:
        print(f"flux-mcp: cannot read {file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"flux-mcp: {file} is {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({"file": str(path), **found}, indent=2))
        return 0 if found["provenance"] else 1
    alpha = ", alpha" if found["alpha"] else ""
    print(f"{path}: {found['format']} {found['width']}x{found['height']}{alpha}")
    if not found["provenance"]:
        print("no flux-mcp provenance in this file (it was not made by flux-mcp, or its metadata was stripped)",
              file=sys.stderr)
        return 1
    for key, value in found["provenance"].items():
        print(f"{key}: {value}")
    return 0


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
    from .files import STALE_IN_DATA_FOLDER, sweep_stale_temp_files
    from .providers import registry
    from .server import build_server

    # Temp files a killed process left mid-write (a live process's own are younger than this).
    sweep_stale_temp_files(settings.home / "images", STALE_IN_DATA_FOLDER, recursive=True)
    default = registry.default_provider(settings)
    if transport == "stdio":
        log.info("flux-mcp %s serving stdio; default provider %s; data folder %s", __version__, default,
                 settings.home)
        from .stdio import run_stdio

        server = build_server(settings)
        heap.serving()
        run_stdio(server)
        return 0
    from .transport import is_loopback, token_problem

    for name, named in settings.auth_tokens:
        if problem := token_problem(named.get_secret_value(), f"FLUX_MCP_AUTH_TOKENS' entry for {name}"):
            print(f"flux-mcp: refusing to serve {transport}: {problem}", file=sys.stderr)
            return 2
    if settings.auth_token is not None and (problem := token_problem(settings.auth_token.get_secret_value())):
        print(f"flux-mcp: refusing to serve {transport}: {problem}", file=sys.stderr)
        return 2
    if not is_loopback(host) and not settings.http_auth:
        print(f"flux-mcp: refusing to listen on {host} without FLUX_MCP_AUTH_TOKEN, FLUX_MCP_AUTH_TOKENS or "
              "FLUX_MCP_OAUTH_ISSUER; set a token (clients then send 'Authorization: Bearer <token>') or bind "
              "127.0.0.1.", file=sys.stderr)
        return 2
    from .transport import serve_http

    log.info("flux-mcp %s serving %s on http://%s:%d%s; default provider %s; data folder %s", __version__,
             transport, host, port, "/sse" if transport == "sse" else "/mcp", default, settings.home)
    if settings.oauth is not None:
        log.info("OAuth: accepting access tokens from %s for %s%s", settings.oauth.issuer, settings.oauth.resource_url,
                 f" with scope {' '.join(settings.oauth.required_scopes)}" if settings.oauth.required_scopes else "")
    if transport == "sse":
        log.warning("the SSE transport is deprecated (kept for old clients); use --transport streamable-http")
    heap.serving()
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
    print("\nFLUX models by name (`model` takes the name on any provider listed; * configured):")
    for name, about in listing["canonical_models"].items():
        served = ", ".join(("*" if pid in about["configured"] else "") + pid for pid in about["served_by"])
        print(f"  {name:<18} {about['label']:<22} {served}")
    return 0
