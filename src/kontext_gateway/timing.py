"""Small time helpers every layer uses: ISO timestamps as the APIs write them, elapsed milliseconds,
and HTTP's Retry-After."""

from __future__ import annotations

import email.utils
import time
from datetime import UTC, datetime


def iso(at: datetime | None) -> str | None:
    """`2026-12-05T00:39:11.123456Z`: UTC with a Z, as Replicate's and OpenAI's objects write times."""
    return None if at is None else at.isoformat().replace("+00:00", "Z")


def ms_since(t0: float) -> int:
    """Whole milliseconds since `t0`, a time.perf_counter() reading."""
    return int((time.perf_counter() - t0) * 1000)


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header as seconds from now (it is a number of seconds or an HTTP date); None when
    absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        at = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return max(0.0, (at - datetime.now(UTC)).total_seconds())
