"""Images on S3-compatible storage (shared mode): `S3Store`, the `ImageStore` protocol over obstore.

Selected when FLUX_MCP_S3_URL (`s3://bucket[/prefix]`) is set; the endpoint and credentials come from
the standard AWS_* variables. Every replica, and through presigned URLs every remote client, reaches
the same objects:

* **Deterministic keys**: `<prefix>/images/<provider>/<id>-<hash8>-<n>.<ext>`, the folder store's
  layout, so two replicas that finish one job write the same bytes to the same key.
* **Create-only writes** (`If-None-Match: *`, S3 conditional writes): the first write of a key wins and
  a second one is refused by the store, which counts as kept (it holds the same image). The object
  is never replaced in place, so no reader ever sees a half-written image.
* **Presigned GET URLs** (`presign`, SigV4, FLUX_MCP_PRESIGN_SECONDS, at most 7 days) are signed
  locally on every answer, never stored: results give them to remote clients in `images[].url`.

A location is `s3://<bucket>/<key>`; only this store's own keys are read or deleted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .store import _EXTENSIONS, _OBJECT_NAME, FolderStore

MAX_PRESIGN_SECONDS = 604_800
"""SigV4 presigned URLs live at most seven days."""


@dataclass(frozen=True)
class S3Location:
    """Where the images go: a bucket and a key prefix (no leading or trailing slash)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url.strip())
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ConfigError(f"FLUX_MCP_S3_URL must look like s3://bucket or s3://bucket/prefix (got {url!r}).")
        return cls(parts.netloc, parts.path.strip("/"))


def s3_config(env: Mapping[str, str]) -> dict[str, str]:
    """The obstore settings read from the standard AWS_* variables (only those that are set)."""
    names = {"AWS_ACCESS_KEY_ID": "access_key_id", "AWS_SECRET_ACCESS_KEY": "secret_access_key",
             "AWS_SESSION_TOKEN": "session_token", "AWS_REGION": "region", "AWS_DEFAULT_REGION": "default_region",
             "AWS_ENDPOINT_URL": "endpoint", "AWS_ENDPOINT_URL_S3": "endpoint",
             "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "virtual_hosted_style_request", "AWS_ALLOW_HTTP": "allow_http"}
    return {key: env[var].strip() for var, key in names.items() if env.get(var, "").strip()}


class S3Store:
    """Images as objects in one bucket (under an optional prefix)."""

    def __init__(self, where: S3Location, config: Mapping[str, str], *, presign_seconds: float = 3600):
        try:
            from obstore.store import S3Store as _ObStore
        except ImportError:
            raise ConfigError("FLUX_MCP_S3_URL is set but S3 support is not installed: "
                              "pip install 'flux-image-mcp[cluster]'.") from None
        options = dict(config)
        endpoint = options.get("endpoint", "")
        allow_http = options.pop("allow_http", "").lower() in ("1", "true", "yes") or endpoint.startswith("http://")
        self.where = where
        self._static_keys = bool(options.get("access_key_id") and options.get("secret_access_key"))
        self.presign_seconds = min(max(presign_seconds, 1), MAX_PRESIGN_SECONDS)
        client: dict[str, Any] = {"allow_http": allow_http, "timeout": timedelta(seconds=60),
                                  "connect_timeout": timedelta(seconds=5)}
        region = options.pop("region", "") or options.pop("default_region", "") or "us-east-1"
        options.pop("default_region", None)
        # Path-style requests unless asked: what S3-compatible servers (and AWS itself) all accept.
        hosted = options.pop("virtual_hosted_style_request", "").lower() in ("1", "true", "yes")
        self._store = _ObStore(where.bucket, region=region, virtual_hosted_style_request=hosted,
                               client_options=client, **options)  # type: ignore[arg-type]

    # --- keys ---------------------------------------------------------------------------------

    def key(self, prediction_id: str, index: int, ext: str) -> str:
        """The object key of image `index` (relative to the bucket, not the store's prefix)."""
        relative = FolderStore.relative_name(prediction_id, index, ext)
        return "/".join(filter(None, [self.where.prefix, "images", relative]))

    def location(self, key: str) -> str:
        return f"s3://{self.where.bucket}/{key}"

    def _key_of(self, location: str) -> str:
        """The key of one of this store's own locations (FileNotFoundError for anything else)."""
        head = f"s3://{self.where.bucket}/"
        key = location[len(head):] if location.startswith(head) else ""
        own = "/".join(filter(None, [self.where.prefix, "images"])) + "/"
        if not key.startswith(own) or ".." in key.split("/") or not re.fullmatch(r"[A-Za-z0-9._/-]+", key):
            raise FileNotFoundError(location)
        return key

    # --- the ImageStore protocol ----------------------------------------------------------------

    async def put(self, prediction_id: str, index: int, payload: bytes, ext: str) -> str:
        """Writes the object only if the key is free (`If-None-Match: *`); a key already written holds the
        same image (keys are deterministic), so the refusal is success."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        key = self.key(prediction_id, index, ext)
        mime = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}.get(ext)
        try:
            await obstore.put_async(self._store, key, payload, mode="create",
                                    attributes={"Content-Type": mime} if mime else None)
        except (AlreadyExistsError, PreconditionError):
            pass
        return self.location(key)

    async def find(self, prediction_id: str, index: int) -> str | None:
        for ext in _EXTENSIONS:
            key = self.key(prediction_id, index, ext)
            if await self._exists(key):
                return self.location(key)
        return None

    async def _exists(self, key: str) -> bool:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            await obstore.head_async(self._store, key)
        except (NotFoundError, FileNotFoundError):
            return False
        return True

    async def read(self, location: str) -> bytes:
        import obstore
        from obstore.exceptions import NotFoundError

        key = self._key_of(location)
        try:
            result = await obstore.get_async(self._store, key)
            return bytes(await result.bytes_async())
        except NotFoundError:
            raise FileNotFoundError(location) from None

    async def present(self, location: str | None) -> bool:
        if not location:
            return False
        try:
            key = self._key_of(location)
        except FileNotFoundError:
            return False
        return await self._exists(key)

    async def discard(self, location: str) -> bool:
        import obstore

        try:
            key = self._key_of(location)
        except FileNotFoundError:
            return False
        if not await self._exists(key):
            return False
        await obstore.delete_async(self._store, key)
        return True

    # --- shared mode --------------------------------------------------------------------------

    async def presign(self, location: str) -> str | None:
        """A presigned GET URL of one of this store's objects (None for any other location)."""
        import obstore

        try:
            key = self._key_of(location)
        except FileNotFoundError:
            return None
        expires = timedelta(seconds=self.presign_seconds)
        if self._static_keys:
            # With keys given, signing is local CPU work of some microseconds: done on the loop (the async form
            # hops to a thread and back, which costs several times the signing itself).
            return obstore.sign(self._store, "GET", key, expires)
        # Other credentials (an instance role, web identity) may have to be fetched first: never on the loop.
        return await obstore.sign_async(self._store, "GET", key, expires)

    async def presign_origin(self) -> str:
        """`scheme://host[:port]` of this store's presigned URLs (what a web page must allow images from)."""
        from .media import origin_of

        url = await self.presign(self.location(self.key("x:y", 0, "png")))
        return origin_of(url or "") or ""

    # --- objects beside the images (upload links, gallery logins: see `uploads`) -----------------------

    def _object_key(self, name: str) -> str:
        if not _OBJECT_NAME.match(name) or ".." in name:
            raise ValueError(f"not an object name: {name!r}")
        return "/".join(filter(None, [self.where.prefix, name]))

    async def put_object(self, name: str, payload: bytes, *, create: bool = False) -> bool:
        """Writes the object `name`; with `create`, only if the key is free (`If-None-Match: *`: of two
        writers, on any replica, one wins). True if this call wrote it."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            await obstore.put_async(self._store, self._object_key(name), payload,
                                    mode="create" if create else "overwrite")
        except (AlreadyExistsError, PreconditionError):
            return False
        return True

    async def get_object(self, name: str) -> bytes | None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            result = await obstore.get_async(self._store, self._object_key(name))
            return bytes(await result.bytes_async())
        except (NotFoundError, FileNotFoundError):
            return None

    async def list_objects(self, prefix: str) -> list[tuple[str, float]]:
        """The objects beside the images whose names start with `prefix` (e.g. "uploads/"), with when each
        was last written (epoch seconds): what retention looks at."""
        import obstore

        folder = prefix.strip("/")
        if not folder.isidentifier():
            raise ValueError(f"not an object folder: {prefix!r}")
        base = "/".join(filter(None, [self.where.prefix, folder])) + "/"
        found: list[tuple[str, float]] = []
        async for chunk in obstore.list(self._store, prefix=base, chunk_size=500):
            for meta in chunk:
                key = str(meta["path"])
                name = key[len(self.where.prefix) + 1:] if self.where.prefix else key
                found.append((name, meta["last_modified"].timestamp()))
        return found

    async def delete_object(self, name: str) -> bool:
        """Deletes the object `name` (True if it was there)."""
        import obstore
        from obstore.exceptions import NotFoundError

        key = self._object_key(name)
        try:
            await obstore.head_async(self._store, key)
        except (NotFoundError, FileNotFoundError):
            return False
        await obstore.delete_async(self._store, key)
        return True

    async def ping(self) -> None:
        """Raises unless the bucket answers (the readiness check): one listing of at most one key."""
        import obstore

        stream = obstore.list(self._store, prefix=self.where.prefix or None, chunk_size=1)
        async for _ in stream:
            break
