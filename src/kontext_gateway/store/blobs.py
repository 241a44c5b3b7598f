"""Image bytes on local disk, content-addressed (the links that serve them are links.py's).

Modes: images 0644 and their folders 0755 at most (never writable by others, whatever the umask);
who may read them at all is the private data directory's to say (0700, Gateway.start).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

EXTENSIONS = ("png", "jpg", "gif", "webp", "avif")
# The only shape of id ever accepted: it is joined onto a filesystem path, so this is the traversal guard.
# fullmatch, not `$`, which would let a trailing newline through.
_BLOB_ID = re.compile(r"[0-9a-f]{64}\.(?:png|jpg|gif|webp|avif)")


class LocalBlobStore:
    """Files at `root/ab/cd/<sha256>.<ext>`: same bytes, same id, so a retry never duplicates a file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, data: bytes, *, ext: str) -> str:
        ext = ext.lower().lstrip(".")
        ext = "jpg" if ext == "jpeg" else ext
        if ext not in EXTENSIONS:
            raise ValueError(f"unsupported blob extension {ext!r}")
        blob_id = f"{hashlib.sha256(data).hexdigest()}.{ext}"
        target = self._location(blob_id)
        if target.is_file():
            return blob_id
        self._mkdirs(target.parent)
        # Write aside then rename: a reader (or a crash) never sees a half-written image.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; let a front web server read it too
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return blob_id

    def path(self, blob_id: str) -> Path | None:
        if not isinstance(blob_id, str) or not _BLOB_ID.fullmatch(blob_id):
            return None
        location = self._location(blob_id)
        return location if location.is_file() else None

    def get(self, blob_id: str) -> bytes | None:
        location = self.path(blob_id)
        if location is None:
            return None
        try:
            return location.read_bytes()
        except FileNotFoundError:  # removed between the check and the read
            return None

    def _location(self, blob_id: str) -> Path:
        return self.root / blob_id[:2] / blob_id[2:4] / blob_id

    def _mkdirs(self, folder: Path) -> None:
        """`folder` and the folders up to the root, each made with 0755 at most: mkdir(parents=True)
        gives the ones above the last the umask's mode, 0777 under umask 0."""
        for level in (self.root, folder.parent, folder):
            level.mkdir(mode=0o755, parents=True, exist_ok=True)
