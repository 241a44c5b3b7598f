"""How to talk to one hosted upstream, as pure functions over plain data: a `Dialect`.

A dialect builds the calls (submit a task for `count` images, poll it, cancel it, upload an input
image) and reads the answers (a task, its state, the result URLs, what an error status means). It
knows its routes: which fields each takes, of which type and range, how it wants images. It does no
I/O: `hosted.HostedProvider` sends the calls, retries, journals tasks, limits concurrency, downloads
the results and keeps the key to the provider's own hosts, the same way for every upstream.

A new upstream is one dialect file (and a line in providers/__init__.py), catalog entries, a fake
in tests/fakes/ and a row in the contract tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..catalog import ProviderEntry
from ..config import Settings
from ..params import nearest_ratio, parse_ratio
from .base import ImageJob, Refusal
from .calls import Answer, Call, Done, Encoded, Polled, Task
from .errors import (
    Malformed,
    Misconfigured,
    PaymentRequired,
    RateLimited,
    Rejected,
    ServerError,
    UpstreamError,
)
from .inputs import data_uri
from .routes import Route


@dataclass
class Submission:
    """A submit call, and what building it decided about the request's parameters."""

    call: Call
    count: int  # the images the task makes
    route: Route  # the published route the body is for
    # Body field -> the request parameter it carries, where the names differ (guidance_scale <- cfg_scale).
    sources: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # asked for, not sent: the route has no such field
    adjusted: dict[str, str] = field(default_factory=dict)  # parameter -> what was sent instead, and why

    def refusal(self) -> Refusal | None:
        """Why the body cannot be sent, checked against the route's published schema: a value out
        of the route's range names its request parameter and the range; None when it validates."""
        for problem in self.route.problems(self.call.json):
            name = next((p for p in problem.path if isinstance(p, str) and p != "input"), None)
            if name is None or problem.keyword in ("required", "additionalProperties"):
                # The builder's fault, not the caller's: never sent, so the upstream never 422s on it.
                return Refusal(f"the {self.route.id} request would break its published schema ({problem})")
            param = self.sources.get(name, name)
            value = _at(self.call.json, problem.path)
            return Refusal(
                f"{param}={value!r} is outside what {self.route.id} takes"
                + (f" as {name}" if name != param else "")
                + f": {self.route.allowed(name)}",
                param=param,
            )
        return None


class Dialect:
    name: ClassVar[str]
    credential_field: ClassVar[str]  # the Settings field holding the key, e.g. "fal_key"
    base_url_field: ClassVar[str]  # the Settings field holding the base URL
    credential_env: ClassVar[str]  # the variable users set, for messages
    # Hosts besides the base URL's that the provider documents for the URLs it returns and wants its
    # key on (polling, status, cancel, uploads); "*" is one DNS label. Reached over https only.
    credential_hosts: ClassVar[tuple[str, ...]] = ()
    batch_limit: ClassVar[int] = 1  # images one task can make (fal: 4)
    default_concurrency: ClassVar[int | None] = None  # active tasks per provider; None: unlimited
    model_concurrency: ClassVar[dict[str, int]] = {}  # per provider model id (BFL: kontext-max 6)
    # Base64 bytes an input image may take inline in a request; None: no documented limit. Above it,
    # the image goes through `upload` (and without one, inline anyway: the route's only way).
    inline_limit: ClassVar[int | None] = None
    HANDLING: ClassVar[dict[str, dict[str, str]]] = {}

    def __init__(self, settings: Settings) -> None:
        self.base_url = str(getattr(settings, self.base_url_field)).rstrip("/")

    def configured_urls(self) -> list[str]:
        """The URLs the operator configured for this provider: their origins get the key."""
        return [self.base_url]

    # -- who may use it, and how ----------------------------------------------------------------------

    def credentials(self, key: str) -> dict[str, str]:
        """The headers that carry the key (added by the executor, on the provider's hosts only)."""
        raise NotImplementedError

    def handling(self, entry: ProviderEntry) -> dict[str, dict[str, str]]:
        return dict(self.HANDLING)

    def unsupported(self, entry: ProviderEntry, job: ImageJob) -> Refusal | None:
        """Why this route cannot serve the job, or None. A value the route cannot take names its
        parameter: the router prefers a route that can, else answers 400 with the allowed range."""
        if len(job.images) > entry.max_input_images:
            return Refusal(f"takes at most {entry.max_input_images} input image(s)", param="image")
        # Features of the local engine: refused rather than silently dropped.
        if job.mask is not None:
            return Refusal("does not take a mask", param="mask")
        if job.loras:
            return Refusal("does not take LoRA adapters", param="loras")
        if job.negative_prompt or (job.true_cfg_scale or 1) > 1:
            return Refusal("has no negative prompt / true CFG", param="negative_prompt")
        # The body this job would send, with stand-ins for its images, against the published schema.
        stand_ins = [f"https://inputs.invalid/{i}.jpeg" for i in range(len(job.images))]
        return self.submit(entry, job, min(self.batch_limit, job.n), stand_ins).refusal()

    def route(self, entry: ProviderEntry, job: ImageJob) -> Route:
        """The published route this job goes to."""
        raise NotImplementedError

    # -- building calls -------------------------------------------------------------------------------

    def submit(self, entry: ProviderEntry, job: ImageJob, count: int, images: list[str]) -> Submission:
        """The call that starts a task making `count` images; `images` as `image_ref` gave them."""
        raise NotImplementedError

    def image_ref(self, encoded: Encoded, url: str | None) -> str:
        """An input image as the route takes it: by URL when uploaded, else inline."""
        return url if url is not None else data_uri(encoded)

    def upload(self, encoded: Encoded) -> Call | None:
        """The call that uploads an input too large to send inline; None: the upstream has no upload."""
        return None

    def uploaded(self, answer: Answer, encoded: Encoded) -> tuple[str, Call | None]:
        """(the URL to send for the uploaded image, a call still to make, or None)."""
        raise NotImplementedError

    def poll(self, entry: ProviderEntry, task: Task) -> Call:
        raise NotImplementedError

    def cancel(self, entry: ProviderEntry, task: Task) -> Call | None:
        """The call that stops a task nobody waits for; None: the upstream has no cancel."""
        return None

    # -- reading answers ------------------------------------------------------------------------------

    def submitted(self, entry: ProviderEntry, answer: Answer, count: int) -> Task:
        raise NotImplementedError

    def polled(self, entry: ProviderEntry, task: Task, answer: Answer) -> Polled:
        raise NotImplementedError

    def fetched(self, entry: ProviderEntry, task: Task, answer: Answer) -> Done:
        """The result, from the answer to a `Fetch` call."""
        raise NotImplementedError

    def classify(self, answer: Answer, call: Call) -> UpstreamError | None:
        """What an answer to `call` means when it is an error (status 400 and up), else None."""
        status = answer.status
        if status < 400:
            return None
        where = f"{call.method} {_path(call.url)} -> {status}"
        detail = _detail(answer)
        if status in (401, 403):
            return Misconfigured(f"{where}: credentials rejected ({detail})", status=status)
        if status == 402:
            return PaymentRequired(f"{where}: {detail}", status=status)
        if status == 429:
            return RateLimited(f"{where}: {detail}", status=status, retry_after=_retry_after(answer))
        if status in (408, 425) or status >= 500:
            return ServerError(f"{where}: {detail}", status=status, retry_after=_retry_after(answer))
        return Rejected(f"{where}: {detail}", status=status)

    # -- parameters -----------------------------------------------------------------------------------

    def passthrough(self, job: ImageJob, route: Route) -> dict[str, Any]:
        """The request's extra parameters this route takes: those its published schema has, typed as
        the catalog declares them (multipart form fields arrive as strings; upstreams validate JSON
        types). The catalog's provider-only parameters go only to the providers they name."""
        declared = {p.name: p for p in job.model.params}
        out: dict[str, Any] = {}
        for key, value in job.extra.items():
            param = declared.get(key)
            if (param is not None and self.name not in param.providers) or not route.has(key):
                continue
            out[key] = value if param is None else typed(value, param.type)
        return out

    @staticmethod
    def ignored(job: ImageJob, sent: dict[str, Any], consumed: tuple[str, ...] = ()) -> list[str]:
        """The request's parameters not sent: extras the route has no field for (and not turned into
        another field, `consumed`), and cfg_scale / num_inference_steps where the route has none."""
        unsent = set(job.extra) - set(sent) - set(consumed)
        if job.guidance is not None and "cfg_scale" not in consumed:
            unsent.add("cfg_scale")
        if job.steps is not None and "num_inference_steps" not in consumed:
            unsent.add("num_inference_steps")
        return sorted(unsent)

    def upstream_format(self, job: ImageJob, route: Route, field: str = "output_format") -> str:
        """The format to ask for: the requested one when the route makes it, else lossless png (the
        gateway converts). Always sent explicitly, so every upstream answers alike."""
        made = formats_of(route, field)
        return job.output_format if job.output_format in made else "png"

    @staticmethod
    def aspect_ratio(job: ImageJob, supported: tuple[str, ...]) -> str | None:
        """The upstream ratio nearest what was asked. None when nothing was asked (text-to-image
        callers pick their default; an edit keeps the input's shape)."""
        if job.size.size is not None:
            return nearest_ratio(job.size.size.ratio, supported)
        if job.size.aspect_ratio:
            return nearest_ratio(parse_ratio(job.size.aspect_ratio) or 1.0, supported)
        return None

    @staticmethod
    def keeps_input_shape(job: ImageJob) -> bool:
        """An edit with no shape asked keeps the input's (a resolution alone does not change it)."""
        return bool(job.images) and (job.size.size is None or (not job.size.exact and job.size.aspect_ratio is None))


def formats_of(route: Route, field: str = "output_format") -> tuple[str, ...]:
    """The output formats `route` makes, from its published enum ("jpg" read as jpeg)."""
    schema = route.fields.get(field, {})
    values: list[Any] = []
    for option in schema.get("anyOf", [schema]):
        values += option.get("enum", [])
    return tuple("jpeg" if v == "jpg" else v for v in values if isinstance(v, str))


def _at(body: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        try:
            body = body[part]
        except (KeyError, IndexError, TypeError):
            return None
    return body


def safety_level(value: Any) -> int | None:
    """A safety tolerance as an int 0-6 (it may arrive as "3"); None when it is not a number."""
    try:
        return max(0, min(6, int(value)))
    except (TypeError, ValueError):
        return None


def typed(value: Any, kind: str) -> Any:
    """A form string as the JSON type the catalog declares; anything else (or unparsable) unchanged,
    so the upstream's own validation names the field."""
    if not isinstance(value, str):
        return value
    try:
        if kind == "boolean" and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if kind == "integer":
            return int(value)
        if kind == "number":
            return float(value)
    except ValueError:
        pass
    return value


def json_object(answer: Answer, what: str) -> dict[str, Any]:
    """The answer's body as a JSON object, or Malformed."""
    if not isinstance(answer.body, dict):
        raise Malformed(f"{what}: the answer is not a JSON object", status=answer.status)
    return answer.body


def _path(url: str) -> str:
    """The URL without its query string: enough to say where, never a signed token."""
    return url.split("?", 1)[0]


def _retry_after(answer: Answer) -> float | None:
    from ..timing import retry_after_s

    return retry_after_s(answer.headers.get("retry-after"))


def _detail(answer: Answer) -> str:
    """A short, safe description of an error body (providers use `detail`, `error` or `message`)."""
    body = answer.body
    if isinstance(body, dict):
        for key in ("detail", "error", "message", "title"):
            if body.get(key):
                value = body[key]
                return (value if isinstance(value, str) else str(value))[:300]
        return str(body)[:200]
    return "no JSON body" if body is None else str(body)[:200]
