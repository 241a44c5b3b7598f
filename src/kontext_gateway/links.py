"""This gateway's own links: signing image links, and reading what an own link names.

An image link is `<base>/v1/blobs/<id>?exp=<unix>&sig=<b64url(HMAC-SHA256(secret, "<path>:<exp>"))>`:
the link is its own credential (an `<img src>` cannot send a header), valid until `exp`. Its base is
`KONTEXT_PUBLIC_URL` when set, else the URL the request came in on (whose Host is one of the allowed
hosts: api/trusted.py). A link of this gateway given back as an input (an earlier output, an uploaded
file's URL) is read from the store directly, never fetched over HTTP.

With `KONTEXT_BLOB_LINKS=presigned`, image links are the object store's own presigned URLs instead
(same lifetime): clients fetch the bytes from the store, not through the gateway. Links signed by the
gateway stay valid until they expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from typing import Protocol
from urllib.parse import SplitResult, urlsplit

from .keys import Principal
from .store.blobs import BlobStore
from .store.records import FileRow

BLOB_ROUTE = "/v1/blobs/"
FILES_ROUTE = "/v1/files/"
_EXP = re.compile(r"[0-9]{1,12}")  # int() alone would take "+1", " 1", "1_0" and non-ASCII digits


class URLSigner:
    """`exp=<unix>&sig=<b64url(HMAC-SHA256(secret, "<path>:<exp>"))>`: the link is its own credential."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("URL signing secret must not be empty")
        self._secret = secret

    def sign(self, path: str, ttl_seconds: int, now: float | None = None) -> str:
        exp = int(time.time() if now is None else now) + int(ttl_seconds)
        return f"exp={exp}&sig={self._signature(path, str(exp))}"

    def verify(self, path: str, exp: str, sig: str, now: float | None = None) -> bool:
        if not isinstance(exp, str) or not isinstance(sig, str) or not _EXP.fullmatch(exp) or not sig.isascii():
            return False
        if int(exp) < (time.time() if now is None else now):
            return False
        # compare_digest: timing must not reveal how much of a forged signature was right.
        return hmac.compare_digest(self._signature(path, exp).encode(), sig.encode())

    def _signature(self, path: str, exp: str) -> str:
        digest = hmac.new(self._secret, f"{path}:{exp}".encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class FileLookup(Protocol):
    async def get_file(self, id: str) -> FileRow | None: ...


class OwnLinks:
    def __init__(
        self,
        signer: URLSigner,
        blobs: BlobStore,
        files: FileLookup,
        *,
        public_url: str | None,
        ttl_s: int,
        presigned: bool = False,
    ) -> None:
        if presigned and not blobs.presigns:
            raise ValueError(f"{blobs!r} makes no presigned URLs")
        self.presigned = presigned
        self.signer = signer
        self.blobs = blobs
        self.files = files
        self.public_url = public_url
        self.ttl_s = ttl_s

    def blob_url(self, base_url: str, blob_id: str) -> str:
        """A signed link to a stored image, valid `ttl_s` from now: the store's own when presigned."""
        if self.presigned:
            return self.blobs.presigned_url(blob_id, self.ttl_s)
        path = BLOB_ROUTE + blob_id
        base = (self.public_url or base_url).rstrip("/")
        return f"{base}{path}?{self.signer.sign(path, self.ttl_s)}"

    def verify_blob(self, blob_id: str, exp: str, sig: str) -> bool:
        return self.signer.verify(BLOB_ROUTE + blob_id, exp, sig)

    async def signed_blob(self, path: str, query: str) -> bytes | None:
        """The bytes behind one of this gateway's image links (`/v1/blobs/<id>?exp=..&sig=..`), when its
        signature holds and it has not expired; else None."""
        args = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        if not self.signer.verify(path, args.get("exp", ""), args.get("sig", "")):
            return None
        return await self.blobs.get(path[len(BLOB_ROUTE) :])

    def is_own(self, url: SplitResult, base_url: str) -> bool:
        """Whether `url` points at this gateway (the host it was reached on, or its public URL)."""
        ours = {urlsplit(base_url).netloc}
        if self.public_url:
            ours.add(urlsplit(self.public_url).netloc)
        return url.netloc in ours

    async def read(self, url: SplitResult, principal: Principal) -> bytes | None:
        """What an own URL names: an uploaded file of the caller's (`/v1/files/<id>[/download]`), or a
        stored image by its signed link; None when it names nothing (or its link has expired)."""
        if url.path.startswith(FILES_ROUTE):
            record = await self.files.get_file(url.path[len(FILES_ROUTE) :].removesuffix("/download"))
            data = await self.blobs.get(record.blob_id) if record is not None and principal.owns(record) else None
            if data is not None:
                return data
        if url.path.startswith(BLOB_ROUTE):
            return await self.signed_blob(url.path, url.query)
        return None
