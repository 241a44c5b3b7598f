"""Persistence: request records (SQLite / PostgreSQL, alembic-migrated) and the local image blob store."""

from kontext_gateway.store.blobs import LocalBlobStore, URLSigner
from kontext_gateway.store.db import Database, RequestRecord

__all__ = ["Database", "LocalBlobStore", "RequestRecord", "URLSigner"]
