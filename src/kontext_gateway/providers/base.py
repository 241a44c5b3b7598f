"""The one small protocol every provider implements, and the plain data that crosses it.

A provider turns an `ImageJob` (the normalised, validated request) into images. It declares, per
unified parameter, how it handles it (native / renamed / converted / emulated), which the compiled
schema shows. It knows nothing of HTTP requests coming in, and the gateway does everything it
emulates (output format conversion, response_format, storage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..catalog import Mode, ModelSpec, ProviderEntry
from ..params import Size, SizeRequest
from ..store.records import Lane

if TYPE_CHECKING:
    from PIL.Image import Image

    from .calls import Encoded

ProgressFn = Callable[[int, int], None]  # (step, total)


class Cancellation:
    """Set once a job is abandoned; read from any thread (the local engine checks it per step). A
    flag, not a `threading.Event`: nothing waits on it, and an Event (a lock and a condition) made
    for every job showed in the event loop's profile."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True  # one store: atomic under the GIL, seen by every thread's next check

    def is_set(self) -> bool:
        return self._set


@dataclass
class ImageJob:
    request_id: str
    model: ModelSpec
    mode: Mode
    prompt: str
    images: list[Image]  # decoded RGB inputs, EXIF orientation applied
    size: SizeRequest
    n: int
    seed: int
    output_format: str
    output_compression: int | None
    guidance: float | None = None
    steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown / provider-only: passed through
    progress: ProgressFn | None = None
    attempts: list[Attempt] = field(default_factory=list)  # every try, across providers, in order
    encoded_inputs: list[Encoded] | None = None  # inputs compacted once for upstreams (see inputs.py)
    # Set when the request is abandoned: work on other threads (the local engine) checks it per step.
    cancelled: Cancellation = field(default_factory=Cancellation)
    journal: TaskJournal | None = None  # durable jobs record their upstream tasks here
    # -- the local engine's features; remote providers reject what they cannot do --
    mask: Image | None = None  # mode "L", same size as images[0]: 255 where to repaint, 0 where to keep
    negative_prompt: str | None = None  # true CFG: with true_cfg_scale > 1, a second pass per step
    true_cfg_scale: float | None = None
    loras: list[dict[str, Any]] = field(default_factory=list)  # [{"path": str, "scale": float}]
    partial_images: int = 0  # previews wanted while it runs (stream=true): 0..3
    # Called (from the engine's thread) with each preview: (index 0.., a decoded picture at output size).
    preview: Callable[[int, Image], None] | None = None


@dataclass
class Attempt:
    """One upstream task or local run, as `metadata.attempts` shows it."""

    provider: str
    config_key: str
    outcome: str  # "succeeded" | "failed" | "skipped"
    duration_ms: int
    images: int = 0
    # A failed attempt whose upstream still made (and billed) images, e.g. the download failed.
    billed_images: int | None = None
    error_class: str | None = None
    status_code: int | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class ProviderImage:
    """One produced image: decoded pixels, or encoded bytes with their format (remote providers)."""

    image: Image | None = None
    data: bytes | None = None
    format: str | None = None
    size: Size | None = None
    blob_id: str | None = None  # `data`, already in the blob store (the task journal keeps results)


class TaskJournal(Protocol):
    """Where a job keeps its upstream tasks, so that a job resumed after a crash polls the tasks it
    already submitted instead of submitting (and paying for) them again."""

    def resumable(self, slot: int, config_key: str) -> tuple[int, Any] | None:
        """(row, Task) of a task submitted for this slot and entry and not finished, if any."""
        ...

    async def finished_images(self, slot: int, config_key: str) -> list[ProviderImage] | None:
        """The images of a task for this slot and entry that already finished, if any."""
        ...

    async def submitted(self, slot: int, config_key: str, task: Any) -> int: ...

    async def finished(self, row: int, *, images: list[ProviderImage] | None) -> None:
        """images None: the task failed."""
        ...


@dataclass
class ProviderResult:
    images: list[ProviderImage]
    size: Size
    seed: int | None = None
    ignored_params: list[str] = field(default_factory=list)
    # Parameters sent otherwise than asked (a value the route caps), with what was sent and why.
    adjusted_params: dict[str, str] = field(default_factory=dict)
    engine: dict[str, Any] | None = None  # the local engine's account of the run (transformer, acceleration)


@dataclass(frozen=True)
class Refusal:
    """Why a provider route cannot serve a job. `param`: the request parameter it cannot take (as
    asked), when that is why: the router then prefers another route, or answers 400 naming it."""

    reason: str
    param: str | None = None

    def __str__(self) -> str:
        return self.reason


class Provider(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def lane(self) -> Lane:
        """The claim loop its jobs run in: hosted upstreams wait (many at once), an engine computes."""
        ...

    def handling(self, entry: ProviderEntry) -> dict[str, dict[str, str]]:
        """For this catalog entry: unified parameter -> {"handling": native|renamed|converted|emulated,
        "as": upstream name}."""
        ...

    def available(self, entry: ProviderEntry) -> bool:
        """Whether this provider can serve the catalog entry now (configured, weights present...)."""
        ...

    def unavailable_reason(self, entry: ProviderEntry) -> str: ...

    def unsupported(self, entry: ProviderEntry, job: ImageJob) -> Refusal | None:
        """Why this entry cannot serve this job (too many images, a value out of range...), or None."""
        ...

    async def generate(self, entry: ProviderEntry, job: ImageJob) -> ProviderResult: ...

    async def aclose(self) -> None: ...
