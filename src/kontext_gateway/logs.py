"""Logs: one JSON object per line (or plain text on a terminal), with request context, secrets redacted.

Context travels in a contextvar, so code that logs needs no ids passed down:

    with logs.bind(request_id=rid, key_id=key_id):   # every record logged inside carries them,
        await runner.run(record)                      # asyncio tasks started inside included
    logs.set_context(provider="fal")                  # or: for the rest of the current task

Known fields: request_id, prediction_id, key_id, provider, outcome; any other keyword works too, and
so does `log.info(..., extra={"outcome": "succeeded"})` for one record.

Redaction is a safety net, not a licence to log secrets: every string that goes out is scrubbed of
bearer tokens, gateway keys (`kx-...`), webhook secrets (`whsec_...`), Replicate tokens (`r8_...`)
and the secret values configured in Settings.
"""

from __future__ import annotations

import contextlib
import contextvars
import json as jsonlib
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

REDACTED = "[redacted]"
_TOKENS = r"(?i:bearer)\s+\S+|kx-[A-Za-z0-9_-]{16,}|whsec_\S+|r8_\S+"
_MIN_SECRET = 6  # shorter configured "secrets" would redact ordinary words
_SECRET_FIELDS = (
    "replicate_api_token",
    "fal_key",
    "fireworks_api_key",
    "bfl_api_key",
    "webhook_secret",
    "url_secret",
    "admin_key",
)
# Attributes every LogRecord has; whatever else a record carries came from `extra=` and is logged.
# uvicorn's `color_message` is its message again with ANSI colours.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message", "taskName"}

# The default is never mutated: bind() and set_context() set a new dict.
_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("kontext_log_context", default={})  # noqa: B039


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add fields (None values are left out) to every record logged inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def set_context(**fields: Any) -> None:
    """Add fields for the rest of the current context (an asyncio task: until it ends)."""
    _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def current() -> dict[str, Any]:
    return dict(_context.get())


class Redactor:
    """Replaces token-shaped substrings and the given secret values with "[redacted]": one regex."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = sorted({s for s in secrets if s and len(s) >= _MIN_SECRET}, key=len, reverse=True)
        self._pattern = re.compile("|".join([*(re.escape(v) for v in values), _TOKENS]))

    def __call__(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text)


class Formatter(logging.Formatter):
    """JSON lines ({"ts", "level", "logger", "message", ...context, "exc_info"}) or text with the
    context appended as key=value; redacted either way."""

    def __init__(self, *, json: bool = True, secrets: Iterable[str] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.json = json
        self.redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        fields = {**_context.get(), **{k: v for k, v in vars(record).items() if k not in _STANDARD}}
        if not self.json:
            text = super().format(record)
            if fields:
                text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
            return self.redact(text)
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **fields,
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack_info"] = record.stack_info
        return jsonlib.dumps({k: self._value(v) for k, v in out.items()}, ensure_ascii=False)

    def _value(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return self.redact(value if isinstance(value, str) else str(value))


def choose_format(flag: str | None = None) -> str:
    """ "json" or "text": the flag, else KONTEXT_LOG_FORMAT, else text on a terminal, JSON otherwise
    (a log collector reads the process's stderr)."""
    value = (flag or os.environ.get("KONTEXT_LOG_FORMAT") or "").strip().lower()
    if value in ("json", "text"):
        return value
    return "text" if sys.stderr.isatty() else "json"


def settings_secrets(settings: Any) -> list[str]:
    """The secret values configured in Settings, for the redactor."""
    out = []
    for name in _SECRET_FIELDS:
        value = getattr(settings, name, None)
        if value is not None:
            out.append(value.get_secret_value() if hasattr(value, "get_secret_value") else str(value))
    return out


def configure(level: str | int = "info", *, json: bool | None = None, secrets: Iterable[str] = ()) -> None:
    """One stderr handler on the root logger with our formatter; uvicorn's loggers propagate to it
    (run uvicorn with `log_config=None` so it does not install its own). json None: choose_format()."""
    if json is None:
        json = choose_format() == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter(json=json, secrets=secrets))
    number = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Debug is for the gateway's own code and uvicorn: libraries' debug output (aiosqlite logs every
    # statement with its parameters) stays off.
    root.setLevel(max(number, logging.INFO))
    logging.getLogger("kontext_gateway").setLevel(number)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # httpx logs every request's full URL at INFO; a webhook URL may carry a token in its query.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings as log lines too, not bare text on stderr
