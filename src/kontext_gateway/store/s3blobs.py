"""Blobs in S3-compatible object storage (AWS S3, Cloudflare R2, MinIO, ...), through obstore.

`KONTEXT_BLOB_URL=s3://bucket/prefix`. Credentials, region and endpoint come from the standard AWS
environment, as obstore's S3 builder reads it: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL (another store than AWS; plain http allowed when it
says http://), and where those are absent web identity, container or instance credentials.

Objects sit where the local directory puts its files, `<prefix>/ab/cd/<sha256>.<ext>`, so copying a
data directory's `blobs/` into the bucket moves a gateway onto it. Each put is one PUT, never a HEAD
first: the same bytes under the same key are the same object, so writing them again changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import NotFoundError, PermissionDeniedError
from obstore.store import S3Store

from .blobs import CACHE_CONTROL, MEDIA_TYPES, Blob, BlobStoreUnavailable, content_id, fanned_out, valid_id

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from obstore import GetResult
    from obstore.store import ClientConfig, RetryConfig

T = TypeVar("T")
_CHUNK = 256 * 1024  # what a served object is streamed in
_THREADS = 64
_MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs live a week at most
# The hot path retries what S3 asks to be retried (503 SlowDown, 500s, dropped connections), but gives up
# within half a minute rather than obstore's default three: a request waits on it.
_RETRY: RetryConfig = {"max_retries": 3, "retry_timeout": timedelta(seconds=30)}
# The start-up probe answers in seconds: a bad endpoint or key is reported, not retried for minutes.
_PROBE_RETRY: RetryConfig = {"max_retries": 1, "retry_timeout": timedelta(seconds=10)}
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
# What an S3 error code means for whoever configured the store.
_HINTS = {
    "NoSuchBucket": "the bucket does not exist",
    "InvalidAccessKeyId": "the access key is unknown (AWS_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "the secret key is wrong (AWS_SECRET_ACCESS_KEY)",
    "AccessDenied": "the credentials may not write to this bucket",
    "InvalidToken": "the session token is invalid (AWS_SESSION_TOKEN)",
    "ExpiredToken": "the session token has expired (AWS_SESSION_TOKEN)",
    "PermanentRedirect": "the bucket is in another region (AWS_REGION)",
    "AuthorizationHeaderMalformed": "the bucket is in another region (AWS_REGION)",
}


class S3BlobStore:
    """Every request runs in a thread of the store's own, through obstore's blocking API (which lets go
    of the GIL while it waits), never through its asyncio API: that one hands results back from tokio's
    threads, and one still doing so as the interpreter exits aborts the process (a `kontext worker`
    exiting after a failed start-up did, about one run in five)."""

    presigns = True

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if parts.scheme != "s3" or not bucket or parts.query or parts.fragment:
            raise BlobStoreUnavailable(f"KONTEXT_BLOB_URL={url!r} is not of the form s3://bucket[/prefix]")
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        self.endpoint = next((os.environ[v] for v in _ENDPOINT_VARIABLES if os.environ.get(v)), None)
        client: ClientConfig = {"connect_timeout": timedelta(seconds=5)}
        if self.endpoint and self.endpoint.startswith("http://"):
            client["allow_http"] = True  # asked for by the endpoint itself (a MinIO on this host)
        try:
            self._store = S3Store(bucket, prefix=prefix or None, client_options=client, retry_config=_RETRY)
            self._probe_store = S3Store(
                bucket,
                prefix=prefix or None,
                client_options={**client, "timeout": timedelta(seconds=10)},
                retry_config=_PROBE_RETRY,
            )
        except Exception as exc:  # a malformed AWS_* variable
            raise BlobStoreUnavailable(f"blob store {self.url}: {_reason(exc, self.endpoint)}") from exc
        # The threads wait on the network, not on the CPU: many, so that a burst of images is not queued
        # behind a few slow requests (nor behind the default pool's image encoding).
        self._threads = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="s3-blobs")
        self._refusal_logged = False

    def __repr__(self) -> str:
        return f"S3BlobStore({self.url!r}, endpoint={self.endpoint!r})"

    async def put(self, data: bytes, *, ext: str, cached: bool = True) -> str:  # nothing cached here
        return await self._run(self._put, data, ext)

    async def get(self, blob_id: str) -> bytes | None:
        if not valid_id(blob_id):
            return None
        return await self._run(self._read, fanned_out(blob_id))

    async def open(self, blob_id: str) -> Blob | None:
        if not valid_id(blob_id):
            return None
        result = await self._run(self._get, fanned_out(blob_id))
        if result is None:
            return None
        return Blob(blob_id, result.meta["size"], self._chunks(result))

    async def exists(self, blob_id: str) -> bool:
        return valid_id(blob_id) and await self._run(self._head, fanned_out(blob_id))

    async def delete(self, *blob_ids: str) -> None:
        keys = [fanned_out(b) for b in blob_ids if valid_id(b)]
        if keys:  # one DELETE, or one DeleteObjects request per thousand keys
            await self._run(obstore.delete, self._store, keys[0] if len(keys) == 1 else keys)

    def presigned_url(self, blob_id: str, ttl_s: int) -> str:
        if not valid_id(blob_id):
            raise ValueError(f"not a blob id: {blob_id!r}")
        # Signing is local (an HMAC over the request with the credentials at hand): no request is made.
        expires = timedelta(seconds=max(1, min(ttl_s, _MAX_PRESIGN_S)))
        return obstore.sign(self._store, "GET", fanned_out(blob_id), expires)

    async def writable(self) -> None:
        """Put, get and delete a small probe object of this process's own (`_probe/<random>`, which is
        never a blob's key); raises BlobStoreUnavailable, one line saying what failed, if any of them
        does."""
        try:
            await self._run(self._probe)
        except BlobStoreUnavailable:
            raise
        except Exception as exc:
            where = f" at {self.endpoint}" if self.endpoint else ""
            raise BlobStoreUnavailable(f"blob store {self.url}{where}: {_reason(exc, self.endpoint)}") from exc

    async def close(self) -> None:
        await asyncio.to_thread(self._threads.shutdown, wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def _chunks(self, result: GetResult) -> AsyncIterator[bytes]:
        stream = result.stream(min_chunk_size=_CHUNK)
        while (chunk := await self._run(next, stream, None)) is not None:
            yield bytes(chunk)

    # -- in the store's threads -------------------------------------------------------------------------

    def _put(self, data: bytes, ext: str) -> str:
        blob_id = content_id(data, ext)
        # One PUT, even above obstore's multipart threshold: an image is well under S3's 5 GB limit, and
        # a multipart upload would cost three requests more and could leave parts behind if cut short.
        obstore.put(
            self._store,
            fanned_out(blob_id),
            data,
            attributes={"Content-Type": MEDIA_TYPES[blob_id.rsplit(".", 1)[1]], "Cache-Control": CACHE_CONTROL},
            use_multipart=False,
        )
        return blob_id

    def _get(self, key: str) -> GetResult | None:
        try:
            return obstore.get(self._store, key)
        except (FileNotFoundError, NotFoundError):
            return None
        except PermissionDeniedError:
            self._refused(key)
            return None

    def _read(self, key: str) -> bytes | None:
        result = self._get(key)
        return None if result is None else bytes(result.bytes())

    def _head(self, key: str) -> bool:
        try:
            obstore.head(self._store, key)
        except (FileNotFoundError, NotFoundError):
            return False
        except PermissionDeniedError:
            self._refused(key)
            return False
        return True

    def _refused(self, key: str) -> None:
        """A read refused (403). Reading works (the start-up probe read its object back), so this is S3's
        answer for a key that is not there when the credentials lack s3:ListBucket: a missing blob,
        said once in the log, not a server error for whoever asked."""
        if not self._refusal_logged:
            self._refusal_logged = True
            log.warning(
                "blob store %s: S3 refused to read %s (403) and answers so for every missing object: read "
                "as missing; give the credentials s3:ListBucket on the bucket so that S3 answers 404",
                self.url,
                key,
            )

    def _probe(self) -> None:
        key, probe = f"_probe/{uuid.uuid4().hex}", b"kontext-gateway probe"
        obstore.put(self._probe_store, key, probe, use_multipart=False)
        if bytes(obstore.get(self._probe_store, key).bytes()) != probe:
            raise BlobStoreUnavailable(f"blob store {self.url}: a probe object read back other bytes")
        obstore.delete(self._probe_store, key)


def _reason(exc: BaseException, endpoint: str | None) -> str:
    """One line out of an obstore error, which holds the request, the S3 error's XML and a debug dump."""
    text = str(exc)
    code = re.search(r"<Code>([^<]*)</Code>", text)
    if code:
        message = re.search(r"<Message>([^<]*)</Message>", text)
        said = f"{code.group(1)}" + (f" ({message.group(1)})" if message else "")
        hint = _HINTS.get(code.group(1))
        return f"{hint}: {said}" if hint else said
    status = re.search(r"status code: (\d{3} [^:\n]*)", text)
    if status:
        return f"the store answered {status.group(1).strip()}"
    if "error sending request" in text or "connect" in text.lower():
        return f"cannot connect to {endpoint or 'S3'} ({_first_line(text.rsplit(' - ', 1)[-1])})"
    return _first_line(text)


def _first_line(text: str) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "no detail")
    return line if len(line) <= 300 else line[:297] + "..."
