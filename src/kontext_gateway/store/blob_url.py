"""KONTEXT_BLOB_URL: which blob store a gateway keeps its images and uploaded files in."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .blobs import BlobStore, BlobStoreUnavailable, LocalBlobStore

if TYPE_CHECKING:
    from ..config import Settings


def open_blob_store(settings: Settings) -> BlobStore:
    """The store `KONTEXT_BLOB_URL` names (`s3://bucket/prefix`), or the data directory's `blobs/` when it
    is unset. A configuration no store can serve raises BlobStoreUnavailable (nothing is reached yet:
    `writable()` does that)."""
    url = settings.blob_url
    if not url:
        if settings.blob_links == "presigned":
            raise BlobStoreUnavailable(
                "KONTEXT_BLOB_LINKS=presigned needs an object store (KONTEXT_BLOB_URL=s3://bucket/prefix); "
                "the local blob directory has no presigned URLs"
            )
        return LocalBlobStore(settings.data_dir / "blobs")
    if url.startswith("s3://"):
        from .s3blobs import S3BlobStore  # obstore is loaded only by a gateway that uses it

        return S3BlobStore(url)
    raise BlobStoreUnavailable(f"KONTEXT_BLOB_URL={url!r}: only s3://bucket[/prefix] is supported")
