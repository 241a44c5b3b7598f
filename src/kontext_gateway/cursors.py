"""Keyset cursors for listings that page newest first on (created_at, id): opaque to clients, base64
of a short JSON pair. Anything else (longer, nested, not a pair of strings) is refused before it
costs anything."""

from __future__ import annotations

import base64
import json
from datetime import datetime

from . import safejson
from .errors import GatewayError

MAX_CURSOR_CHARS = 512  # ours are about 120


def encode_cursor(at: datetime, rid: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([at.isoformat(), rid]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str] | None:
    """(created_at, id) of the last row of the previous page; None when `cursor` is not one of ours."""
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            return None
        at, rid = safejson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)), max_depth=1)
        if not isinstance(at, str) or not isinstance(rid, str):
            return None
        return datetime.fromisoformat(at), rid
    except (ValueError, TypeError, GatewayError):
        return None
