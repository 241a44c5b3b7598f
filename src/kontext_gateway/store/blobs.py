"""Image bytes, content-addressed: the blob store's interface, and its embedded implementation, a local
directory (object storage is s3blobs.py's, the choice between them blob_url.py's; the links that serve
blobs are links.py's).

A blob's id is `<sha256 of its bytes>.<ext>`: same bytes, same id, so a retry never stores a second copy,
and a purge deletes the one copy once nothing names it any more (history.py).

Local modes: images 0644 and their folders 0755 at most (never writable by others, whatever the umask;
a stricter one takes more away); who may read them at all is the private data directory's to say (0700,
Gateway.start).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import StartupError
from .thread_queue import ThreadQueue

EXTENSIONS = ("png", "jpg", "gif", "webp", "avif")
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "gif": "image/gif", "webp": "image/webp", "avif": "image/avif"}
# Content-addressed: the bytes behind an id never change, so whoever holds them may keep them.
CACHE_CONTROL = "private, max-age=3600, immutable"
# The only shape of id ever accepted: it is joined onto a filesystem path or an object key, so this is the
# traversal guard. fullmatch, not `$`, which would let a trailing newline through.
_BLOB_ID = re.compile(r"[0-9a-f]{64}\.(?:png|jpg|gif|webp|avif)")
_CHUNK = 256 * 1024
# A file for a blob being written aside: always a new one, never inherited by a child process.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
# The kernel's hint to drop a file's cached pages (Linux, the BSDs; macOS has none).
_DROP_PAGES: int | None = getattr(os, "POSIX_FADV_DONTNEED", None)
FILE_THREAD_IDLE_S = 30.0  # a file thread with nothing to do this long ends; the next call starts one


class BlobStoreUnavailable(StartupError):
    """The blob store cannot be used (a folder that cannot be written; a bucket that is missing, out of
    reach or refuses the credentials): one line saying which store and why."""


@dataclass(frozen=True)
class Blob:
    """A stored blob opened to be served: its bytes arrive in `chunks`; a local one also has its `path`,
    which an HTTP server can send itself (sendfile, ranges)."""

    blob_id: str
    size: int
    chunks: AsyncIterator[bytes]
    path: Path | None = None

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.blob_id.rsplit(".", 1)[1]]


class BlobStore(Protocol):
    """Where images and uploaded files are kept, by content-addressed id. Every method but
    `presigned_url` may wait on I/O, so every one of them is a coroutine: the event loop never blocks.
    A malformed id is never looked up: it reads as a missing blob."""

    # Whether `presigned_url` can make links that clients fetch from the store itself.
    presigns: bool

    async def put(self, data: bytes, *, ext: str, cached: bool = True) -> str:
        """Store `data`; returns its id. Storing bytes already stored costs at most one write, and
        leaves one copy. ValueError for an extension that is not an image's. `cached=False` says the
        bytes are read back once at most, and not at once (a result answered by URL): a store that
        would keep them in memory need not (a hint; the local directory drops the file's pages)."""
        ...

    async def get(self, blob_id: str) -> bytes | None:
        """The blob's bytes, or None when there is no such blob."""
        ...

    async def open(self, blob_id: str) -> Blob | None:
        """The blob, to be streamed (or sent as a file), or None when there is no such blob."""
        ...

    async def exists(self, blob_id: str) -> bool: ...

    async def delete(self, *blob_ids: str) -> None:
        """Delete these blobs; ids of blobs already gone (or malformed) are skipped."""
        ...

    def presigned_url(self, blob_id: str, ttl_s: int) -> str:
        """A URL that reads the blob straight from the store for `ttl_s` seconds (only where `presigns`)."""
        ...

    async def writable(self) -> None:
        """Returns when the store takes a write, a read and a delete now (of a small probe of its own,
        never a blob); else raises BlobStoreUnavailable, whose message is one line naming the store and
        what is wrong. Gateway.start calls it, so a bad configuration fails at start-up; a readiness
        probe may call it too (it costs a few small requests to the store)."""
        ...

    async def close(self) -> None:
        """Returns once the writes already begun are done (none is left half-written beside the
        blobs); the store is not used after it."""
        ...


def valid_id(blob_id: object) -> bool:
    return isinstance(blob_id, str) and _BLOB_ID.fullmatch(blob_id) is not None


def content_id(data: bytes, ext: str) -> str:
    """`<sha256>.<ext>`, the extension normalised (`.JPEG` -> `jpg`); ValueError for one not an image's."""
    ext = ext.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in EXTENSIONS:
        raise ValueError(f"unsupported blob extension {ext!r}")
    return f"{hashlib.sha256(data).hexdigest()}.{ext}"


def fanned_out(blob_id: str) -> str:
    """`ab/cd/<id>`: the blob's place below the store's root (a folder) or prefix (a bucket)."""
    return f"{blob_id[:2]}/{blob_id[2:4]}/{blob_id}"


class LocalBlobStore:
    """Files at `root/ab/cd/<sha256>.<ext>`, written aside and renamed into place (a reader, or a crash,
    never sees half an image). File I/O runs on threads of the store's own (an image can be tens of
    megabytes): two, so that one image's hashing overlaps another's write and fsync; each ends after
    `FILE_THREAD_IDLE_S` without work."""

    presigns = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._files = ThreadQueue("kontext-blobs", threads=2, idle_s=FILE_THREAD_IDLE_S)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    async def put(self, data: bytes, *, ext: str, cached: bool = True) -> str:
        return await self._files.call(lambda: self._put(data, ext, cached))

    async def get(self, blob_id: str) -> bytes | None:
        return await self._files.call(lambda: self._read(blob_id))

    async def open(self, blob_id: str) -> Blob | None:
        found = await self._files.call(lambda: self._size(blob_id))
        if found is None:
            return None
        location, size = found
        return Blob(blob_id, size, _file_chunks(self._files, location), location)

    async def exists(self, blob_id: str) -> bool:
        return await self._files.call(lambda: self.path(blob_id)) is not None

    async def delete(self, *blob_ids: str) -> None:
        if blob_ids:
            await self._files.call(lambda: self._delete(blob_ids))

    def presigned_url(self, blob_id: str, ttl_s: int) -> str:
        raise NotImplementedError("a local blob directory has no presigned URLs")

    async def writable(self) -> None:
        try:
            await self._files.call(self._probe)
        except OSError as exc:
            raise BlobStoreUnavailable(
                f"the blob directory {self.root} cannot be written: {exc.strerror or exc}"
            ) from exc

    async def close(self) -> None:
        await self._files.close()

    def path(self, blob_id: str) -> Path | None:
        """The blob's file, or None when there is none (or the id is malformed). Blocking: a thread's."""
        if not valid_id(blob_id):
            return None
        location = self.root / fanned_out(blob_id)
        return location if location.is_file() else None

    def _put(self, data: bytes, ext: str, cached: bool) -> str:
        # Each system call here lets the event loop's thread take the GIL, and taking it back costs
        # wake-ups of both threads when the loop is busy: these are the fewest calls that make a whole,
        # durable file (a folder is made only when opening in it fails, not checked on every put).
        blob_id = content_id(data, ext)
        target = self.root / fanned_out(blob_id)
        if target.is_file():
            return blob_id
        tmp = target.with_name(f".tmp-{secrets.token_hex(8)}")
        try:
            fd = os.open(tmp, _NEW_FILE, 0o644)
        except FileNotFoundError:
            _make_folder(target.parent)
            fd = os.open(tmp, _NEW_FILE, 0o644)
        try:
            try:
                rest = memoryview(data)
                while rest:
                    rest = rest[os.write(fd, rest) :]
                os.fsync(fd)
                if not cached and _DROP_PAGES is not None:
                    # Clean once fsynced, its pages are let go at once, and the next file's write takes
                    # them: left cached, every new file takes memory the kernel has not used yet, which
                    # on a VM whose host maps memory on first use costs several times the copy itself.
                    os.posix_fadvise(fd, 0, 0, _DROP_PAGES)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return blob_id

    def _read(self, blob_id: str) -> bytes | None:
        location = self.path(blob_id)
        if location is None:
            return None
        try:
            return location.read_bytes()
        except FileNotFoundError:  # removed between the check and the read
            return None

    def _size(self, blob_id: str) -> tuple[Path, int] | None:
        location = self.path(blob_id)
        if location is None:
            return None
        try:
            return location, location.stat().st_size
        except FileNotFoundError:  # removed between the check and the stat
            return None

    def _delete(self, blob_ids: tuple[str, ...]) -> None:
        for blob_id in blob_ids:
            location = self.path(blob_id)
            if location is not None:
                location.unlink(missing_ok=True)

    def _probe(self) -> None:
        _make_folder(self.root)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            os.write(fd, b"probe")
            os.lseek(fd, 0, os.SEEK_SET)
            if os.read(fd, 5) != b"probe":
                raise OSError(f"{tmp} did not read back what was written")
        finally:
            os.close(fd)
            os.unlink(tmp)


def _make_folder(folder: Path) -> None:
    """`folder`, and the folders above it that are missing, each made 0755 at most: mkdir(parents=True)
    would make the ones above with the umask's mode, 0777 under umask 0."""
    try:
        os.mkdir(folder, 0o755)
    except FileExistsError:
        pass
    except FileNotFoundError:
        _make_folder(folder.parent)
        _make_folder(folder)


async def _file_chunks(files: ThreadQueue, path: Path) -> AsyncIterator[bytes]:
    with await files.call(lambda: path.open("rb")) as f:
        while chunk := await files.call(lambda: f.read(_CHUNK)):
            yield chunk
