"""The one executor of every hosted upstream: sends what a `Dialect` builds, the same way for all.

A dialect (bfl.py, fireworks.py, replicate.py, fal.py) says what to send and what an answer means.
`HostedProvider` does the I/O around it:

- input images are compacted once per job (inputs.py) and, where the route's inline limit is passed,
  uploaded through the provider's own file mechanism once per provider run;
- `n` is split into tasks of at most `batch_limit` images, run in parallel, billed per image;
- a call that fails before a task exists (429, 5xx, a dropped connection) is tried again, up to
  `upstream_retries` times, with exponential backoff and full jitter (honouring Retry-After);
- a poll that fails transiently polls again: the task is still there;
- a task that ended badly is resubmitted only when the failure is transient (a 5xx, a timeout, a lost
  task, a result that would not download), and at most once: every submit is paid. A task the upstream
  ran and reports failed, moderation, bad credentials and request errors are never resubmitted;
- every try is an `Attempt` on the job, with the images the upstream billed for it;
- results are downloaded at once (upstream URLs expire in minutes) and must decode as images;
- active tasks per provider (or provider/model) are limited: above the limit, requests queue;
- a cancelled request (client gone, deadline passed) cancels the upstream task;
- the provider's key goes only to the provider's own hosts: the configured base URL's origin, the
  origins the operator adds (`provider_hosts`), and over https the hosts the dialect documents
  (`credential_hosts`: BFL's polling_url, fal's status_url...). A returned URL anywhere else is refused
  before anything is sent, and a call that carries the key never follows a redirect. Result downloads
  carry no key and follow redirects.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import httpx
from yarl import URL

from ..catalog import ProviderEntry
from ..config import Settings
from ..errors import GatewayError
from ..imaging import inspect_image, parse_data_url
from ..params import Size
from ..store.records import Lane
from ..timing import ms_since
from .base import Attempt, ImageJob, ProviderImage, ProviderResult, Refusal
from .calls import Answer, Call, Done, Encoded, Fetch, Pending, Task
from .dialect import Dialect, Submission
from .errors import (
    BadResult,
    ConnectionFailed,
    Malformed,
    Moderated,
    ServerError,
    TaskLost,
    Timeout,
    UntrustedURL,
    UpstreamError,
)
from .inputs import compact, inline_size
from .transport import AnswerTooLarge, HttpxUpstream, UpstreamAnswer, UpstreamHTTP, joined_up_to, upstream_http

log = logging.getLogger(__name__)
# The gateway's request id while a job's upstream calls run: every call sends it as `x-request-id`,
# so a provider's support (or its logs) and ours can find the same request.
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("upstream_request_id", default=None)
RESUBMITS = 1  # a task that failed transiently is submitted again at most this often (each one is paid)
POLL_GROWTH = 1.5  # each wait between polls of a task is this much longer than the last, up to the cap
MAX_RESULT_BYTES = 64 * 1024 * 1024  # a result larger than any image Kontext makes is not one


class HostedProvider:
    """The Provider protocol for one hosted upstream, spoken in `dialect`."""

    lane: ClassVar[Lane] = Lane.HOSTED

    def __init__(
        self, dialect: type[Dialect], settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        """`transport`: where the calls go (default: aiohttp's connections; tests pass httpx's mock)."""
        self.settings = settings
        self.dialect = dialect(settings)
        self.name = dialect.name
        secret = getattr(settings, dialect.credential_field)
        self._key: str | None = secret.get_secret_value() if secret is not None else None
        # The configured URLs' origins, and those the operator adds (`provider_hosts`).
        configured = [*self.dialect.configured_urls(), *settings.provider_hosts.get(self.name, [])]
        self._own_origins = {_origin(URL(url)) for url in configured}
        # Redirects are never followed on calls (see `send`); result downloads follow them.
        timeout = httpx.Timeout(60.0, connect=10.0)
        self.http: UpstreamHTTP = (
            upstream_http(timeout=timeout, max_connections=256)
            if transport is None
            else HttpxUpstream(transport, timeout=timeout)
        )
        self._semaphores: dict[str, asyncio.Semaphore] = {}

    # -- the Provider protocol -------------------------------------------------------------------------

    def handling(self, entry: ProviderEntry) -> dict[str, dict[str, str]]:
        return self.dialect.handling(entry)

    def available(self, entry: ProviderEntry) -> bool:
        return bool(self._key)

    def unavailable_reason(self, entry: ProviderEntry) -> str:
        return f"{self.dialect.credential_env} is not set"

    def unsupported(self, entry: ProviderEntry, job: ImageJob) -> Refusal | None:
        return self.dialect.unsupported(entry, job)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def generate(self, entry: ProviderEntry, job: ImageJob) -> ProviderResult:
        """All `job.n` images, in parallel tasks of at most `batch_limit`.

        The task making images i.. gets seed + i: the same seed for every task would make n copies
        of one picture on a deterministic upstream, and seed + i keeps the whole set reproducible."""
        token = _request_id.set(job.request_id)  # the tasks gather starts copy it
        try:
            refs = await self._image_refs(job)
            limit = self.dialect.batch_limit
            plans = [
                self.dialect.submit(
                    entry, dataclasses.replace(job, seed=(job.seed + i) % 2**32), min(limit, job.n - i), refs
                )
                for i in range(0, job.n, limit)
            ]
            results = await asyncio.gather(
                *(self._task(entry, job, plan, slot) for slot, plan in zip(range(0, job.n, limit), plans, strict=True)),
                return_exceptions=True,
            )
        finally:
            _request_id.reset(token)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # Prefer the error that matters most to the caller: moderation, then anything else.
            errors.sort(key=lambda e: 0 if isinstance(e, Moderated) else 1)
            raise errors[0]
        images = [img for r in results if not isinstance(r, BaseException) for img in r]
        size = images[0].size or Size(0, 0)  # measured by download(), which decoded it
        first = plans[0]
        return ProviderResult(
            images=images, size=size, seed=job.seed, ignored_params=first.ignored, adjusted_params=first.adjusted
        )

    # -- input images ------------------------------------------------------------------------------------

    async def _image_refs(self, job: ImageJob) -> list[str]:
        """Each input as the route takes it: compacted once per job, then inline when it fits the
        route's inline limit, else uploaded (once per provider run) and sent by URL."""
        if not job.images:
            return []
        if job.encoded_inputs is None:
            job.encoded_inputs = await asyncio.to_thread(lambda: [compact(im) for im in job.images])
        limit = self.dialect.inline_limit
        refs = []
        for encoded in job.encoded_inputs:
            url = None
            if limit is not None and inline_size(encoded) > limit:
                url = await self._upload(encoded)
            refs.append(self.dialect.image_ref(encoded, url))
        return refs

    async def _upload(self, encoded: Encoded) -> str | None:
        """The URL of `encoded` uploaded to the provider's storage, or None where it has none."""
        call = self.dialect.upload(encoded)
        if call is None:
            return None
        answer = await self._retried(call, "upload")
        url, then = self.dialect.uploaded(answer, encoded)
        if then is not None:
            await self._retried(then, "upload")
        return url

    # -- tasks -------------------------------------------------------------------------------------------

    async def _task(self, entry: ProviderEntry, job: ImageJob, plan: Submission, slot: int) -> list[ProviderImage]:
        """One task's images: submitted (again only where that is worth paying for), polled, downloaded.
        Every try is recorded on the job as an Attempt."""
        if job.journal is not None and (done := await job.journal.finished_images(slot, entry.config_key)):
            return done  # finished before a restart: its images are stored
        before_task = 0  # failures before a task existed upstream (nothing was made, nothing paid)
        resubmits = 0
        while True:
            t0 = time.perf_counter()
            try:
                async with self._slot(entry):
                    images = await self._run_task(entry, job, plan, slot)
            except UpstreamError as exc:
                err = exc
            else:
                job.attempts.append(Attempt(self.name, entry.config_key, "succeeded", ms_since(t0), images=len(images)))
                return images
            job.attempts.append(self._failed_attempt(entry, err, t0))
            if err.submitted:
                resubmits += 1
                again = err.retryable and resubmits <= RESUBMITS
            else:
                before_task += 1
                again = err.retryable and before_task <= self.settings.upstream_retries
            log.info(
                "%s task for %s failed (%s%s): %s %s",
                entry.config_key,
                job.request_id,
                "after submit" if err.submitted else "before a task existed",
                ", trying again" if again else "",
                err.kind,
                err.message[:200],
            )
            if not again:
                raise err
            await asyncio.sleep(self._backoff(before_task + resubmits - 1, err.retry_after))

    def _failed_attempt(self, entry: ProviderEntry, err: UpstreamError, t0: float) -> Attempt:
        billed = err.billed_images
        if billed is None and err.submitted and err.kind in entry.pricing.billed_failures:
            billed = err.images_asked  # the provider documents that it may bill this failure
        return Attempt(
            self.name,
            entry.config_key,
            "failed",
            ms_since(t0),
            error_class=err.kind,
            status_code=err.status,
            message=err.message[:300],
            billed_images=billed,
        )

    async def _run_task(self, entry: ProviderEntry, job: ImageJob, plan: Submission, slot: int) -> list[ProviderImage]:
        journal = job.journal
        resumed = journal.resumable(slot, entry.config_key) if journal is not None else None
        row: int | None
        if resumed is not None:
            row, task = resumed  # submitted before a restart: poll it, never submit again
        else:
            answer = await self.send(plan.call)
            task = self.dialect.submitted(entry, answer, plan.count)
            # Committed before any wait, so a crash from here on resumes this very task.
            row = await asyncio.shield(journal.submitted(slot, entry.config_key, task)) if journal else None
        try:
            async with asyncio.timeout(self.settings.upstream_timeout_s):
                outputs = task.outputs
                waits = poll_schedule(self.settings.upstream_first_poll_s, self.settings.upstream_poll_interval_s)
                while outputs is None:
                    await asyncio.sleep(next(waits))
                    outputs = await self._poll(entry, task)
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
            err = Timeout(f"no result within {self.settings.upstream_timeout_s:g} s")
            err.submitted, err.images_asked = True, plan.count
            raise err from None
        except asyncio.CancelledError:
            # Cancelled by the user: stop the task upstream. Stopped for any other reason (the
            # worker shuts down): leave it running, the next worker resumes it from the journal.
            if job.cancelled.is_set():
                await asyncio.shield(self._abandon(entry, task, journal, row))
            raise
        except UpstreamError as exc:
            exc.submitted, exc.images_asked = True, plan.count
            if journal is not None and row is not None:
                await journal.finished(row, images=None)
            raise
        if journal is not None and row is not None:
            await journal.finished(row, images=images)
        return images

    async def _poll(self, entry: ProviderEntry, task: Task) -> list[str] | None:
        """One look at the task: its result URLs once done, else None. A transient failure of the
        poll itself is polled again (the task is still there), up to `upstream_retries` in a row."""
        failures = 0
        while True:
            try:
                state = self.dialect.polled(entry, task, await self.send(self.dialect.poll(entry, task)))
                if isinstance(state, Pending):
                    return None
                if isinstance(state, Done):
                    return state.outputs
                assert isinstance(state, Fetch)
                return self.dialect.fetched(entry, task, await self.send(state.call)).outputs
            except UpstreamError as exc:
                # Only the transport and the upstream's health: a verdict on the task is final.
                lost = isinstance(exc, TaskLost)  # polling it again finds nothing: resubmit instead
                if lost or not exc.retryable or failures >= self.settings.upstream_retries:
                    raise
                failures += 1
                await asyncio.sleep(self._backoff(failures - 1, exc.retry_after))

    async def _abandon(self, entry: ProviderEntry, task: Task, journal: Any, row: int | None) -> None:
        await self.cancel_quietly(entry, task)
        if journal is not None and row is not None:
            await journal.finished(row, images=None)

    async def cancel_quietly(self, entry: ProviderEntry, task: Task) -> None:
        """Stop a task nobody waits for, where the upstream can; best effort."""
        call = self.dialect.cancel(entry, task)
        if call is None:
            return
        try:
            async with asyncio.timeout(10):
                await self.send(call)
        except Exception as exc:
            log.info("cancel of %s task %s failed: %r", self.name, task.id, exc)

    # -- limits and backoff ------------------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.settings.upstream_backoff_max_s, self.settings.upstream_backoff_s * 2**attempt)
        delay = random.uniform(0, cap)  # full jitter: retries from many requests do not line up
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.settings.upstream_backoff_max_s * 4))
        return delay

    async def _retried(self, call: Call, what: str) -> Answer:
        """A call made before any task exists (an upload): transient failures tried again."""
        for attempt in range(self.settings.upstream_retries + 1):
            try:
                return await self.send(call)
            except UpstreamError as exc:
                if not exc.retryable or attempt == self.settings.upstream_retries:
                    raise
                log.info("%s %s failed, trying again: %s", self.name, what, exc.message[:200])
                await asyncio.sleep(self._backoff(attempt, exc.retry_after))
        raise AssertionError("unreachable")

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
            model_key, configured.get(entry.config_key, self.dialect.model_concurrency.get(entry.provider_model_id))
        )
        if model_limit is not None:
            limits.append((model_key, model_limit))
        provider_limit = configured.get(self.name, self.dialect.default_concurrency)
        if provider_limit is not None:
            limits.append((self.name, provider_limit))
        return limits

    # -- HTTP ----------------------------------------------------------------------------------------------

    async def send(self, call: Call) -> Answer:
        """One call, with transport failures and error statuses classified (by the dialect).

        A call with `credentials` gets the provider's key only once `check_credential_url` accepts its
        URL. No call follows a redirect: whatever an answer says, the key goes nowhere else."""
        headers = dict(call.headers)
        url: str | URL = call.url
        if call.credentials:
            url = self.check_credential_url(call.method, call.url)  # parsed once, sent as checked
            headers.update(self.dialect.credentials(self._key or ""))
        if (rid := _request_id.get()) is not None:
            headers["x-request-id"] = rid
        try:
            resp = await self.http.send(
                call.method,
                url,
                headers=headers,
                json=call.json,
                content=call.content,
                files=call.files,
                data=call.data,
            )
        except httpx.TimeoutException as exc:
            raise Timeout(f"{call.method} {_path(call.url)} timed out ({type(exc).__name__})") from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise ConnectionFailed(f"{call.method} {_path(call.url)}: {type(exc).__name__}") from None
        except AnswerTooLarge as exc:  # not read into memory: no provider documents an answer that long
            raise Malformed(f"{call.method} {_path(call.url)}: {exc}") from None
        if 300 <= resp.status_code < 400:
            raise UntrustedURL(
                f"{call.method} {_path(call.url)} -> {resp.status_code}: a redirect to {_location(resp)}, not "
                f"followed (calls to {self.name} never follow one)",
                status=resp.status_code,
            )
        answer = Answer(resp.status_code, _json_or_none(resp), resp.headers)
        if (error := self.dialect.classify(answer, call)) is not None:
            raise error
        return answer

    def check_credential_url(self, method: str, url: str) -> URL:
        """`url` parsed, once it may get the key: the configured base URL's origin (scheme, host and
        port), an origin the operator added (`provider_hosts`), or https on one of the dialect's
        `credential_hosts`; UntrustedURL otherwise. A returned URL naming any other host (or plain http
        where the provider documents https) never sees the key."""
        try:  # parsed as the client that sends it parses it (yarl: aiohttp's URLs)
            target = URL(url)
            origin = _origin(target)
        except (ValueError, TypeError):
            target, origin = URL(), ("", "", None)
        scheme, host, port = origin
        env = self.dialect.credential_env
        if not host:
            raise UntrustedURL(f"{method} {_path(str(url))[:80]!r}: refused, not an absolute URL; {env} was not sent")
        if origin in self._own_origins:
            return target
        documented = any(_host_matches(pattern, host) for pattern in self.dialect.credential_hosts)
        if documented and scheme == "https" and port == 443:
            return target
        why = (
            f"not one of {self.name}'s hosts"
            if not documented
            else "not over https"
            if scheme != "https"
            else "not on the https port"
        )
        raise UntrustedURL(f"{method} {_site(target)}: refused, {why}; {env} was not sent")

    async def download(self, url: str) -> ProviderImage:
        """Fetch a result at once, without the key, and check that it is an image."""
        if url.startswith("data:"):
            try:
                data = parse_data_url(url, param="output")
            except GatewayError as exc:
                raise BadResult(f"result data URI: {exc.message}") from None
        else:
            data = await self._fetch_result(url)
        try:  # checked whole, not decoded: the runner decodes only what it converts
            fmt, size = inspect_image(data, param="output", max_pixels=self.settings.max_input_pixels)
        except GatewayError as exc:
            raise BadResult(f"the result is not a usable image ({exc.code})") from None
        return ProviderImage(data=data, format=fmt, size=Size(*size))

    async def _fetch_result(self, url: str) -> bytes:
        headers = {"x-request-id": rid} if (rid := _request_id.get()) is not None else {}
        try:
            async with self.http.stream(url, headers=headers) as resp:
                if resp.status_code >= 500:
                    raise ServerError(f"GET {_path(url)} -> {resp.status_code}", status=resp.status_code)
                if resp.status_code >= 400:
                    # A result URL that fails (expired, not yet written...) is a bad result, worth a retry.
                    raise BadResult(f"the result URL answered {resp.status_code}", status=resp.status_code)
                try:
                    return await joined_up_to(resp.aiter_bytes(), MAX_RESULT_BYTES)
                except AnswerTooLarge:
                    raise BadResult(f"the result is over {MAX_RESULT_BYTES // 2**20} MiB") from None
        except httpx.TimeoutException as exc:
            raise Timeout(f"GET {_path(url)} timed out ({type(exc).__name__})") from None
        except httpx.TooManyRedirects:
            raise BadResult(f"GET {_path(url)}: too many redirects") from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise ConnectionFailed(f"GET {_path(url)}: {type(exc).__name__}") from None


def poll_schedule(first: float, cap: float) -> Iterator[float]:
    """Waits before each poll of a task: none before the first (a fast upstream may be done by the
    time its submit is answered), `first` before the second, then POLL_GROWTH times longer each time,
    up to `cap` (a slow task costs about one poll per `cap`). Endless: the task's timeout ends it."""
    yield 0.0
    wait = min(first, cap)
    while True:
        yield wait
        wait = min(wait * POLL_GROWTH, cap)


def _json_or_none(resp: UpstreamAnswer) -> Any:
    try:
        return resp.json()
    except (ValueError, RecursionError):  # not JSON, or nested past what the parser takes
        return None


def _origin(url: URL) -> tuple[str, str, int | None]:
    """(scheme, host, port), the scheme's default port filled in (by yarl): what a key is bound to."""
    return url.scheme, (url.host or "").lower(), url.port


def _site(url: URL) -> str:
    """scheme://host[:port] of a URL, for messages: where, never its path or signed query."""
    return f"{url.scheme}://{url.host}" + (f":{url.explicit_port}" if url.explicit_port else "")


def _location(resp: UpstreamAnswer) -> str:
    try:
        return _site(URL(resp.url).join(URL(resp.headers["location"])))
    except (KeyError, ValueError):
        return "nowhere given"


def _host_matches(pattern: str, host: str) -> bool:
    """`pattern` with "*" as any one DNS label: "api.*.bfl.ai" takes api.us1.bfl.ai, not
    api.bfl.ai.example.com nor a.b.bfl.ai."""
    want, have = pattern.split("."), host.split(".")
    return len(want) == len(have) and all(h == w or (w == "*" and h != "") for w, h in zip(want, have, strict=False))


def _path(url: str) -> str:
    """The URL without its query string: enough to say where, never a signed token."""
    return url.split("?", 1)[0]
