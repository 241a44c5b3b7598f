"""The plain data between a dialect (what to send, what an answer means) and the executor (sending).

A dialect builds `Call`s and reads `Answer`s; it never performs I/O. The executor sends each call
(adding the provider's key only where it may go), and hands back the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Call:
    """One HTTP call to an upstream."""

    method: str
    url: str
    json: Any = None
    content: bytes | None = None  # a raw body (an upload's bytes)
    files: dict[str, tuple[str, bytes, str]] | None = None  # multipart: field -> (filename, bytes, type)
    data: dict[str, str] | None = None  # multipart form fields beside `files`
    headers: Mapping[str, str] = field(default_factory=dict)  # never the key: the executor adds it
    credentials: bool = True  # False: a call that must not carry the key (an upload to a signed URL)


@dataclass(frozen=True)
class Answer:
    """An upstream's answer: its status, its JSON body (None when it has none or is not JSON), its
    headers. An error status reaches a dialect only through `Dialect.classify`."""

    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)

    def object(self) -> dict[str, Any]:
        """The body as a JSON object, or {} when it is not one (the parsers then find nothing)."""
        return self.body if isinstance(self.body, dict) else {}


@dataclass
class Task:
    """A submitted upstream task: what polling and cancelling it need, kept in `data` (also in the
    job's journal, so that a job resumed after a crash polls the very same task). When the submit
    already carried the result (Replicate's `Prefer: wait`), `outputs` holds it."""

    id: str
    data: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None


@dataclass(frozen=True)
class Pending:
    """Still running."""


@dataclass(frozen=True)
class Done:
    outputs: list[str]  # the result URLs (http(s) or data:)


@dataclass(frozen=True)
class Fetch:
    """Finished: the result is the answer to this call (fal's response_url)."""

    call: Call


Polled = Pending | Done | Fetch


@dataclass(frozen=True)
class Encoded:
    """An input image as sent upstream: its bytes and their format."""

    data: bytes
    format: str  # "jpeg", "png" or "webp"

    @property
    def mime(self) -> str:
        return f"image/{self.format}"
