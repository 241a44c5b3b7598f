"""What every hosted upstream shares: submit -> poll -> download, retries, fan-out, limits, cancel.

An adapter (replicate.py, fal.py, fireworks.py, bfl.py) is one file that says how to talk to one
upstream: `submit` a task for `count` images, `poll` it, `cancel` it, and how each unified parameter
maps (`HANDLING`). This base does the rest the same way for all of them:

- `n` is split into tasks of at most `batch_limit` images (1 where the upstream cannot batch), run in
  parallel and billed per image;
- a failed task is retried on the same provider with exponential backoff and full jitter (honouring
  Retry-After) when the failure is transient (429, 5xx, timeout, dropped connection, malformed body,
  a result that is not an image); moderation, bad credentials, payment and request errors are not;
- results are downloaded at once (upstream URLs expire in minutes) and must decode as images;
- active tasks per provider (or provider/model) are limited by a semaphore: above it, requests queue;
- a cancelled request (client gone, deadline passed) cancels the upstream task;
- the provider's key goes only to the provider's own hosts: the configured base URL's origin, and
  over https the hosts it documents for the URLs it returns (`credential_hosts`: BFL's polling_url,
  fal's status_url...). A returned URL anywhere else is refused before anything is sent, and a call
  that carries the key never follows a redirect. Result downloads carry no key and follow redirects.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import io
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from ..catalog import ProviderEntry
from ..config import Settings
from ..errors import GatewayError
from ..imaging import decode_image, parse_data_url, sniff_format
from ..params import Size, nearest_ratio, parse_ratio
from ..timing import ms_since, retry_after_s
from .base import Attempt, ImageJob, ProviderImage, ProviderResult

log = logging.getLogger(__name__)
# The gateway's request id while a job's upstream calls run: every call sends it as `x-request-id`,
# so a provider's support (or its logs) and ours can find the same request.
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("upstream_request_id", default=None)


# -- the one error vocabulary of upstream failures ---------------------------------------------------


class UpstreamError(Exception):
    """A classified upstream failure. `kind` is what the attempt trace shows as its error class."""

    kind: ClassVar[str] = "upstream_error"
    retryable: ClassVar[bool] = True  # worth another try on the same provider
    failover: ClassVar[bool] = True  # worth trying another provider

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.billed_images: int | None = None  # images the upstream made and billed before it failed


class Moderated(UpstreamError):
    """The prompt, an input or the output was flagged. Never retried, never failed over."""

    kind = "content_policy_violation"
    retryable = False
    failover = False


class Misconfigured(UpstreamError):
    """401/403: this provider's credentials are wrong. Fail over and report."""

    kind = "authentication"
    retryable = False


class PaymentRequired(UpstreamError):
    kind = "payment_required"
    retryable = False


class Rejected(UpstreamError):
    """The upstream refused the request itself (400/404/422): another provider may take it."""

    kind = "invalid_request"
    retryable = False


class RateLimited(UpstreamError):
    kind = "rate_limited"


class ServerError(UpstreamError):
    kind = "server_error"


class Timeout(UpstreamError):
    kind = "timeout"


class ConnectionFailed(UpstreamError):
    kind = "connection_error"


class Malformed(UpstreamError):
    kind = "malformed_response"


class UntrustedURL(Malformed):
    """A URL from the provider (one its response returned, or a redirect) leads off its own hosts, so
    its key was not sent there. Not the caller's fault, and the provider would answer alike again: no
    retry on it, fail over."""

    retryable = False


class TaskFailed(UpstreamError):
    """The upstream ran the task and reports that it failed (status Error / failed / canceled)."""

    kind = "task_failed"


class BadResult(UpstreamError):
    """The result URL did not answer with a decodable image."""

    kind = "bad_result"


# -- the adapter contract ------------------------------------------------------------------------------


@dataclass
class Task:
    """A submitted upstream task. Adapters keep whatever they need to poll and cancel it in `data`.

    When the submit call already returned the result (Replicate with `Prefer: wait`), set `outputs`.
    """

    id: str
    data: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None


@dataclass
class Poll:
    done: bool
    outputs: list[str] = field(default_factory=list)  # result URLs (http(s) or data:) when done


class RemoteProvider:
    """Base for hosted upstreams. Subclasses set the class attributes and implement the four hooks."""

    name: ClassVar[str]
    credential_field: ClassVar[str]  # Settings field holding the key, e.g. "fal_key"
    base_url_field: ClassVar[str]  # Settings field holding the base URL
    credential_env: ClassVar[str]  # the variable users set, for messages
    batch_limit: ClassVar[int] = 1  # images one task can make (fal: 4)
    default_concurrency: ClassVar[int | None] = None  # active tasks per provider; None: unlimited
    model_concurrency: ClassVar[dict[str, int]] = {}  # per provider model id (BFL: kontext-max 6)
    output_formats: ClassVar[tuple[str, ...]] = ("png", "jpeg")  # what it can produce natively
    HANDLING: ClassVar[dict[str, dict[str, str]]] = {}
    # Hosts besides the base URL's that the provider documents for the URLs it returns and wants its
    # key on (polling, status, cancel); "*" is one DNS label. Reached over https only.
    credential_hosts: ClassVar[tuple[str, ...]] = ()

    records_attempts: ClassVar[bool] = True

    def __init__(self, settings: Settings, *, client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        secret = getattr(settings, self.credential_field)
        self._key: str | None = secret.get_secret_value() if secret is not None else None
        self.base_url = str(getattr(settings, self.base_url_field)).rstrip("/")
        self._base_origin = _origin(httpx.URL(self.base_url))
        self._extra_origins = {_origin(httpx.URL(o)) for o in settings.provider_hosts.get(self.name, [])}
        # Redirects are chosen per call (see `request`); none is followed unless a call says so.
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(60.0, connect=10.0),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        self._semaphores: dict[str, asyncio.Semaphore] = {}

    # -- hooks an adapter implements -----------------------------------------------------------------

    async def submit(self, entry: ProviderEntry, job: ImageJob, count: int) -> Task:
        raise NotImplementedError

    async def poll(self, entry: ProviderEntry, task: Task) -> Poll:
        raise NotImplementedError

    async def cancel(self, entry: ProviderEntry, task: Task) -> None:
        """Best effort; the default does nothing (Fireworks and BFL have no cancel)."""

    def unsupported(self, entry: ProviderEntry, job: ImageJob) -> str | None:
        """Why this entry cannot serve the job (a reason for the trace), or None."""
        if len(job.images) > entry.max_input_images:
            return f"takes at most {entry.max_input_images} input image(s)"
        # Features of the local engine: refused rather than silently dropped.
        if job.mask is not None:
            return "does not take a mask"
        if job.loras:
            return "does not take LoRA adapters"
        if job.negative_prompt or (job.true_cfg_scale or 1) > 1:
            return "has no negative prompt / true CFG"
        return None

    # -- the Provider protocol -----------------------------------------------------------------------

    def handling(self, entry: ProviderEntry) -> dict[str, dict[str, str]]:
        return dict(self.HANDLING)

    def available(self, entry: ProviderEntry) -> bool:
        return bool(self._key)

    def unavailable_reason(self, entry: ProviderEntry) -> str:
        return f"{self.credential_env} is not set"

    async def aclose(self) -> None:
        await self.client.aclose()

    async def generate(self, entry: ProviderEntry, job: ImageJob) -> ProviderResult:
        """All `job.n` images, in parallel tasks of at most `batch_limit`; each task retried.

        The task making images i.. gets seed + i: the same seed for every task would make n copies
        of one picture on a deterministic upstream, and seed + i keeps the whole set reproducible."""
        if job.images:
            await self.input_base64(job)  # encode the inputs once, before the tasks share the job
        tasks = [
            self._task_with_retries(
                entry, dataclasses.replace(job, seed=(job.seed + i) % 2**32), min(self.batch_limit, job.n - i), slot=i
            )
            for i in range(0, job.n, self.batch_limit)
        ]
        token = _request_id.set(job.request_id)  # the tasks gather starts copy it
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            _request_id.reset(token)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # Prefer the error that matters most to the caller: moderation, then anything else.
            errors.sort(key=lambda e: 0 if isinstance(e, Moderated) else 1)
            raise errors[0]
        images = [img for r in results for img in r]  # type: ignore[union-attr]
        size = images[0].size or Size(0, 0)  # measured by download(), which decoded it
        return ProviderResult(images=images, size=size, seed=job.seed, ignored_params=self.ignored_params(job))

    def ignored_params(self, job: ImageJob) -> list[str]:
        """Provider-only parameters the catalog assigns to other providers: not sent, so ignored.
        Parameters nobody declares are passed through, so they are not known to be ignored."""
        return sorted(set(job.extra) - set(self.passthrough(job)))

    def passthrough(self, job: ImageJob) -> dict[str, Any]:
        """The request's extra parameters to send upstream: unknown ones as they are, and the
        catalog's provider-only ones that name this provider, typed as the catalog declares them
        (multipart form fields arrive as strings; upstreams validate JSON types)."""
        declared = {p.name: p for p in job.model.params}
        out: dict[str, Any] = {}
        for key, value in job.extra.items():
            param = declared.get(key)
            if param is None:
                out[key] = value
            elif self.name in param.providers:
                out[key] = _typed(value, param.type)
        return out

    # -- retries, limits, timeouts -----------------------------------------------------------------------

    async def _task_with_retries(
        self, entry: ProviderEntry, job: ImageJob, count: int, *, slot: int = 0
    ) -> list[ProviderImage]:
        if job.journal is not None and (done := job.journal.finished_images(slot, entry.config_key)):
            return done  # finished before a restart: its images are stored
        tries = self.settings.upstream_retries + 1
        for attempt in range(tries):
            t0 = time.perf_counter()
            try:
                async with self._slot(entry):
                    images = await self._run_task(entry, job, count, slot)
            except UpstreamError as exc:
                err: UpstreamError = exc
            else:
                job.attempts.append(Attempt(self.name, entry.config_key, "succeeded", ms_since(t0), images=len(images)))
                return images
            job.attempts.append(
                Attempt(
                    self.name,
                    entry.config_key,
                    "failed",
                    ms_since(t0),
                    error_class=err.kind,
                    status_code=err.status,
                    message=err.message[:300],
                    billed_images=err.billed_images,
                )
            )
            log.info(
                "%s attempt %d/%d for %s failed: %s %s",
                entry.config_key,
                attempt + 1,
                tries,
                job.request_id,
                err.kind,
                err.message[:200],
            )
            if not err.retryable or attempt == tries - 1:
                raise err
            await asyncio.sleep(self._backoff(attempt, err.retry_after))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.settings.upstream_backoff_max_s, self.settings.upstream_backoff_s * 2**attempt)
        delay = random.uniform(0, cap)  # full jitter: retries from many requests do not line up
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.settings.upstream_backoff_max_s * 4))
        return delay

    @contextlib.asynccontextmanager
    async def _slot(self, entry: ProviderEntry) -> AsyncIterator[None]:
        """Hold every limit that applies: the model's (BFL: 6 for kontext-max) and the provider's
        (BFL: 24 per account). Always model first, then provider, so waiters cannot deadlock."""
        async with contextlib.AsyncExitStack() as stack:
            for key, limit in self._limits(entry):
                if key not in self._semaphores:
                    self._semaphores[key] = asyncio.Semaphore(limit)
                await stack.enter_async_context(self._semaphores[key])
            yield

    def _limits(self, entry: ProviderEntry) -> list[tuple[str, int]]:
        configured = self.settings.provider_concurrency
        limits = []
        model_key = f"{self.name}/{entry.provider_model_id}"
        model_limit = configured.get(
            model_key, configured.get(entry.config_key, self.model_concurrency.get(entry.provider_model_id))
        )
        if model_limit is not None:
            limits.append((model_key, model_limit))
        provider_limit = configured.get(self.name, self.default_concurrency)
        if provider_limit is not None:
            limits.append((self.name, provider_limit))
        return limits

    async def _run_task(self, entry: ProviderEntry, job: ImageJob, count: int, slot: int) -> list[ProviderImage]:
        journal = job.journal
        resumed = journal.resumable(slot, entry.config_key) if journal is not None else None
        row: int | None
        if resumed is not None:
            row, task = resumed  # submitted before a restart: poll it, never submit again
        else:
            task = await self.submit(entry, job, count)
            # Committed before any wait, so a crash from here on resumes this very task.
            row = await asyncio.shield(journal.submitted(slot, entry.config_key, task)) if journal else None
        try:
            async with asyncio.timeout(self.settings.upstream_timeout_s):
                outputs = task.outputs
                while outputs is None:
                    await asyncio.sleep(self.settings.upstream_poll_interval_s)
                    result = await self.poll(entry, task)
                    if result.done:
                        outputs = result.outputs
                if not outputs:
                    raise BadResult("the task finished without an image")
                try:
                    images = list(await asyncio.gather(*(self.download(url) for url in outputs)))
                except UpstreamError as exc:
                    exc.billed_images = len(outputs)  # made and billed upstream, lost on the way here
                    raise
        except TimeoutError:
            # Given up on: stop paying for it upstream, and try again (or fail over).
            await asyncio.shield(self._abandon(entry, task, journal, row))
            raise Timeout(f"no result within {self.settings.upstream_timeout_s:g} s") from None
        except asyncio.CancelledError:
            # Cancelled by the user: stop the task upstream. Stopped for any other reason (the
            # worker shuts down): leave it running, the next worker resumes it from the journal.
            if job.cancelled.is_set():
                await asyncio.shield(self._abandon(entry, task, journal, row))
            raise
        except UpstreamError:
            if journal is not None and row is not None:
                await journal.finished(row, images=None)
            raise
        if journal is not None and row is not None:
            await journal.finished(row, images=images)
        return images

    async def _abandon(self, entry: ProviderEntry, task: Task, journal: Any, row: int | None) -> None:
        await self.cancel_quietly(entry, task)
        if journal is not None and row is not None:
            await journal.finished(row, images=None)

    async def cancel_quietly(self, entry: ProviderEntry, task: Task) -> None:
        try:
            async with asyncio.timeout(10):
                await self.cancel(entry, task)
        except Exception as exc:
            log.info("cancel of %s task %s failed: %r", self.name, task.id, exc)

    # -- HTTP helpers shared by adapters ----------------------------------------------------------------

    async def request(self, method: str, url: str, *, credentials: bool = True, **kwargs: Any) -> httpx.Response:
        """One HTTP call with transport failures and error statuses mapped to the vocabulary above.

        With `credentials` (every API call), the provider's key (`headers()`) is added only once
        `check_credential_url` accepts the URL, and a redirect is an error: whatever a response says,
        the key goes nowhere else. Without (result downloads), redirects are followed, since result
        CDNs redirect, and no hop carries a key."""
        headers = dict(kwargs.pop("headers", None) or {})
        if credentials:
            self.check_credential_url(method, url)
            headers.update(self.headers())
        if (rid := _request_id.get()) is not None:
            headers["x-request-id"] = rid
        try:
            resp = await self.client.request(method, url, headers=headers, follow_redirects=not credentials, **kwargs)
        except httpx.TimeoutException as exc:
            raise Timeout(f"{method} {_path(url)} timed out ({type(exc).__name__})") from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise ConnectionFailed(f"{method} {_path(url)}: {type(exc).__name__}") from None
        except httpx.TooManyRedirects:
            raise BadResult(f"{method} {_path(url)}: too many redirects") from None
        if credentials and 300 <= resp.status_code < 400:
            raise UntrustedURL(
                f"{method} {_path(url)} -> {resp.status_code}: a redirect to {_location(resp)}, not "
                f"followed (calls with {self.credential_env} never follow one)",
                status=resp.status_code,
            )
        self.check_status(resp)
        return resp

    def check_credential_url(self, method: str, url: str) -> None:
        """Raise UntrustedURL unless `url` may get the key: the configured base URL's origin (scheme,
        host and port), an origin the operator added (`provider_hosts`), or https on one of
        `credential_hosts`. A returned URL naming any other host
        (or plain http where the provider documents https) never sees the key."""
        try:
            target = httpx.URL(url)
            origin = _origin(target)
        except (httpx.InvalidURL, TypeError):
            target, origin = httpx.URL(), ("", "", None)
        scheme, host, port = origin
        if not host:
            raise UntrustedURL(
                f"{method} {_path(str(url))[:80]!r}: refused, not an absolute URL; {self.credential_env} was not sent"
            )
        if origin == self._base_origin or origin in self._extra_origins:
            return
        documented = any(_host_matches(pattern, host) for pattern in self.credential_hosts)
        if documented and scheme == "https" and port == 443:
            return
        why = (
            f"not one of {self.name}'s hosts"
            if not documented
            else "not over https"
            if scheme != "https"
            else "not on the https port"
        )
        raise UntrustedURL(f"{method} {_site(target)}: refused, {why}; {self.credential_env} was not sent")

    def check_status(self, resp: httpx.Response) -> None:
        status = resp.status_code
        if status < 400:
            return
        detail = _detail(resp)
        where = f"{resp.request.method} {_path(str(resp.request.url))} -> {status}"
        if status in (401, 403):
            raise Misconfigured(f"{where}: credentials rejected ({detail})", status=status)
        if status == 402:
            raise PaymentRequired(f"{where}: {detail}", status=status)
        if status == 429:
            raise RateLimited(
                f"{where}: {detail}", status=status, retry_after=retry_after_s(resp.headers.get("retry-after"))
            )
        if status in (408, 425) or status >= 500:
            raise ServerError(
                f"{where}: {detail}", status=status, retry_after=retry_after_s(resp.headers.get("retry-after"))
            )
        raise Rejected(f"{where}: {detail}", status=status)

    @staticmethod
    def json(resp: httpx.Response) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            raise Malformed(
                f"{_path(str(resp.request.url))} answered with a body that is not JSON", status=resp.status_code
            ) from None
        if not isinstance(body, dict):
            raise Malformed(
                f"{_path(str(resp.request.url))} answered with JSON that is not an object", status=resp.status_code
            )
        return body

    async def download(self, url: str) -> ProviderImage:
        """Fetch a result at once and check that it is an image. URLs from a configured provider are
        trusted, loopback included (that is how tests point adapters at fakes)."""
        if url.startswith("data:"):
            try:
                data = parse_data_url(url, param="output")
            except GatewayError as exc:
                raise BadResult(f"result data URI: {exc.message}") from None
        else:
            try:
                resp = await self.request("GET", url, credentials=False)
            except (Rejected, PaymentRequired) as exc:
                # A result URL that 404s (expired, not yet written...) is a bad result, worth a retry.
                raise BadResult(f"the result URL answered {exc.status}", status=exc.status) from None
            data = resp.content
        fmt = sniff_format(data)
        try:
            decoded = await asyncio.to_thread(
                decode_image, data, param="output", max_pixels=self.settings.max_input_pixels
            )
        except GatewayError as exc:
            raise BadResult(f"the result is not a usable image ({exc.code})") from None
        return ProviderImage(data=data, format=fmt, size=Size(*decoded.size))

    # -- parameter helpers shared by adapters ------------------------------------------------------------

    def upstream_format(self, job: ImageJob, supported: tuple[str, ...] | None = None) -> str:
        """The format to ask for: the requested one when the upstream makes it, else lossless png
        (the gateway converts). Always sent explicitly, so every upstream answers alike."""
        supported = supported or self.output_formats
        return job.output_format if job.output_format in supported else "png"

    @staticmethod
    def aspect_ratio(job: ImageJob, supported: tuple[str, ...]) -> str | None:
        """The upstream ratio nearest what was asked. None when nothing was asked (t2i callers pick
        their default; an edit keeps the input's shape)."""
        if job.size.size is not None:
            return nearest_ratio(job.size.size.ratio, supported)
        if job.size.aspect_ratio:
            return nearest_ratio(parse_ratio(job.size.aspect_ratio) or 1.0, supported)
        return None

    async def input_data_uris(self, job: ImageJob) -> list[str]:
        return [f"data:image/png;base64,{b}" for b in await self.input_base64(job)]

    async def input_base64(self, job: ImageJob) -> list[str]:
        """Input images as base64 PNG (lossless, EXIF orientation already applied), encoded once per job."""
        if job.input_png is None:
            job.input_png = await asyncio.to_thread(_png_all, job.images)
        return [base64.b64encode(b).decode() for b in job.input_png]

    def headers(self) -> dict[str, str]:
        """The credential headers. Only `request` sends them, after its host check: adapters never
        pass them themselves."""
        raise NotImplementedError


def _png_all(images: list[Any]) -> list[bytes]:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def safety_tolerance(value: Any, *, has_image: bool) -> Any:
    """BFL's scale as an int 0-6; Replicate and Fireworks refuse more than 2 with an input image."""
    try:
        level = max(0, min(6, int(value)))
    except (TypeError, ValueError):
        return value  # sent as given: the upstream's validation names the field
    return min(level, 2) if has_image else level


def _typed(value: Any, kind: str) -> Any:
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


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what a key is bound to."""
    default = {"https": 443, "http": 80}.get(url.scheme)
    return url.scheme, url.host.lower(), url.port or default


def _site(url: httpx.URL) -> str:
    """scheme://host[:port] of a URL, for messages: where, never its path or signed query."""
    return f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")


def _location(resp: httpx.Response) -> str:
    try:
        return _site(resp.url.join(resp.headers["location"]))
    except (KeyError, httpx.InvalidURL):
        return "nowhere given"


def _host_matches(pattern: str, host: str) -> bool:
    """`pattern` with "*" as any one DNS label: "api.*.bfl.ai" takes api.us1.bfl.ai, not
    api.bfl.ai.example.com nor a.b.bfl.ai."""
    want, have = pattern.split("."), host.split(".")
    return len(want) == len(have) and all(h == w or (w == "*" and h != "") for w, h in zip(want, have, strict=False))


def _path(url: str) -> str:
    """The URL without its query string: enough to say where, never a signed token."""
    return url.split("?", 1)[0]


def _detail(resp: httpx.Response) -> str:
    """A short, safe description of an error body (providers use `detail`, `error` or `message`)."""
    try:
        body = resp.json()
    except ValueError:
        return (resp.text or "").strip()[:200] or "no body"
    if isinstance(body, dict):
        for key in ("detail", "error", "message", "title"):
            if body.get(key):
                value = body[key]
                return (value if isinstance(value, str) else str(value))[:300]
    return str(body)[:200]
