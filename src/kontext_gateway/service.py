"""The path of one image request: validate -> normalise -> route -> encode -> store -> respond.

Plain calls on typed data, from a parsed request (`protocol.ImageCall`, made by the HTTP layer or the
CLI) to the OpenAI `ImagesResponse` (plus `metadata`). A synchronous request is a job that is waited
on; a prediction is the same job, not waited on (predictions.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from . import metrics, net, pricing
from .catalog import Catalog, Mode, ProviderEntry
from .config import Settings
from .errors import GatewayError, invalid, not_found, too_large
from .imaging import EXTENSIONS, decode_image, decode_mask, encode_image, parse_data_url, sniff_format
from .jobs.channels import JobChannels
from .jobs.runner import JobEvents
from .jobs.spec import to_params
from .keys import OPEN, KeyStore, Principal, forbidden
from .links import BLOB_ROUTE, OwnLinks
from .params import CONTROL_FIELDS, PARAM_NAMES, Size, resolve_size
from .produced import produced_size
from .protocol import ImageCall, ImageRequest, ImageSource
from .providers.base import ImageJob, ProgressFn
from .ratelimit import RateLimiter
from .routing import Router
from .store import ledger
from .store.blobs import BlobStore
from .store.db import Database
from .store.records import ENDED, JobStatus, Lane, RequestRow
from .timing import ms_since

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

MAX_PASSTHROUGH_BYTES = 64 * 1024
OWN_JOB_POLL_S = 30.0  # how often a waiter reads a job that this process runs (its end is signalled)
# How often a waiter reads a job run elsewhere, while nothing tells this process of its end:
OTHER_JOB_POLL_S = 0.2  # in a process that runs no jobs (an API process): the jobs it waits on run elsewhere
OTHER_JOB_POLL_BUSY_S = 1.0  # in one that runs jobs too
# ... and while something does (PostgreSQL's notice, the SQLite watch): the read is only a safety net.
HEARD_JOB_POLL_S = 2.0


class JobQueue(Protocol):
    """Where jobs run (the worker): told when one is enqueued, asked to stop one."""

    concurrency: int
    # Set once this process is stopping (SIGTERM): its jobs go back to the queue, none is canceled
    # because a request waiting on it was cut off by the stop.
    draining: bool

    def wake(self) -> None: ...

    def cancel(self, request_id: str) -> bool: ...

    def runs(self, request_id: str) -> bool:
        """Whether this process runs the job now (its end then arrives as an in-process signal)."""
        ...

    async def reserve(self, lane: Lane) -> str | None:
        """A free slot in this process for a job of `lane` about to be enqueued: the worker id to
        write it claimed by, or None (it is queued for whichever worker claims it)."""
        ...

    def unreserve(self, lane: Lane) -> None: ...

    def hand(self, record: RequestRow) -> None:
        """Run a job enqueued already claimed, in the slot reserve() took."""
        ...


@dataclass
class ImageOutcome:
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)  # the images' bytes, for b64_json responses


@dataclass
class _Prepared:
    job: ImageJob
    forced: ProviderEntry | None
    params: ImageRequest
    inputs: list[bytes]  # the input images as sent (stored, for a job run again after a crash)
    entries: list[ProviderEntry]  # the candidates, in the order they would be tried


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class ImageService:
    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        router: Router,
        db: Database,
        blobs: BlobStore,
        links: OwnLinks,
        channels: JobChannels,
        jobs: JobQueue,
        limits: RateLimiter,
        keys: KeyStore,
        events: JobEvents,
        ends_heard: Callable[[], bool] = lambda: False,
    ) -> None:
        """`ends_heard()`: whether this process hears now of the ends of jobs run elsewhere (then a
        waiter reads such a job rarely)."""
        self.settings = settings
        self.catalog = catalog
        self.router = router
        self.db = db
        self.blobs = blobs
        self.links = links
        self.channels = channels
        self.jobs = jobs
        self.limits = limits
        self.keys = keys
        self.events = events  # told of a job canceled before any worker took it
        self.ends_heard = ends_heard

    async def create(
        self,
        call: ImageCall,
        *,
        base_url: str,
        provider: str | None = None,
        principal: Principal = OPEN,
        progress: ProgressFn | None = None,
        request_id: str | None = None,
    ) -> ImageOutcome:
        request_id = await self.submit(
            call,
            base_url=base_url,
            provider=provider,
            principal=principal,
            progress=progress,
            request_id=request_id,
            waiter=True,
        )
        return await self.render(await self.wait(request_id), base_url)

    async def submit(
        self,
        call: ImageCall,
        *,
        base_url: str,
        provider: str | None = None,
        principal: Principal = OPEN,
        progress: ProgressFn | None = None,
        request_id: str | None = None,
        webhook: str | None = None,
        webhook_events: list[str] | None = None,
        waiter: bool = False,
    ) -> str:
        """Validate, check the key's limits, reserve the estimated cost and enqueue: the job is
        committed (with its reservation) before anyone waits on it. Returns its id.
        `waiter`: the caller will wait() on it, so its completion signal is set up first."""
        request_id = request_id or new_request_id()
        t0 = time.perf_counter()
        try:
            prepared = await self._prepare(request_id, call, provider, principal, base_url)
            job = prepared.job
            await self._rate_limit(principal, job.n)
            estimate = pricing.estimate(prepared.entries, job.n)
        except GatewayError as exc:
            await self._reject(exc, request_id, call, principal.key_id, t0)
            raise
        input_blob_ids = await self._store_inputs(prepared.inputs)
        mask_blob_id = await self._store_mask(job.mask) if job.mask is not None else None
        params = to_params(
            job,
            input_blob_ids=input_blob_ids,
            response_format=prepared.params.response_format or "url",
            requested_model=prepared.params.model,
            forced=prepared.forced.config_key if prepared.forced else None,
            provider=provider,
            mask_blob_id=mask_blob_id,
            stream=bool(prepared.params.stream),
        )
        if progress is not None:
            self.channels.progress[request_id] = progress
        if waiter:
            self.channels.completion(request_id)  # registered before the job can finish
        # The worst case over the providers it may fail over to is held; the actual cost is settled.
        # Only API keys have budgets: the open gateway's requests need no ledger entry.
        reservation = (
            ledger.Reservation(principal.key_id, estimate.max_micros, principal.budget_period, principal.max_concurrent)
            if principal.stored
            else None
        )
        lane = self.router.providers[prepared.entries[0].provider].lane
        worker = await self.jobs.reserve(lane)
        try:
            record = await self.db.create_request(
                id=request_id,
                endpoint=_endpoint(call),
                model=job.model.id,
                mode=call.mode,
                params=params,
                key_id=principal.key_id,
                input=call.input if call.input is not None else _safe_params(call.fields),
                version=call.version,
                webhook=webhook,
                webhook_events=webhook_events,
                reservation=reservation,
                lane=lane,
                claimed_by=worker,
                lease_s=self.settings.job_lease_s,
            )
        except (ledger.BudgetExceeded, ledger.ConcurrencyExceeded, ledger.KeyRevoked) as refused:
            if worker is not None:
                self.jobs.unreserve(lane)
            self.channels.forget(request_id)
            refusal = _refusal(refused, principal)
            if isinstance(refused, ledger.BudgetExceeded):
                metrics.budget_rejected()
            elif isinstance(refused, ledger.ConcurrencyExceeded):
                metrics.rate_limited("concurrency")
            await self._reject(refusal, request_id, call, principal.key_id, t0)
            raise refusal from None
        except BaseException:
            if worker is not None:
                self.jobs.unreserve(lane)
            raise
        if worker is not None:
            self.jobs.hand(record)  # no claim needed: written as this process's worker's
        else:
            self.jobs.wake()
        return request_id

    async def estimate(
        self, call: ImageCall, *, base_url: str, provider: str | None = None, principal: Principal = OPEN
    ) -> dict[str, Any]:
        """`dryRun`: validate as a real request would be, and price it; nothing runs or is stored.

        Priced from the catalog: when no configured provider of the model can serve the request, for
        those that would once configured (`configured: false`, and each one's reason).
        `size` is what the first provider would produce (`requested_size` when that differs)."""
        prepared = await self._prepare(new_request_id(), call, provider, principal, base_url, prospective=True)
        job = prepared.job
        est = pricing.estimate(prepared.entries, job.n)
        body = est.body(job.model.id)
        routes = [self._prospect(entry, job) for entry in prepared.entries]
        requested = str(job.size.size) if job.size.size else "auto"
        body.update(n=job.n, size=routes[0]["size"])
        if routes[0]["size"] != requested:
            body["requested_size"] = requested
        body["configured"] = any(r["configured"] for r in routes)
        body["providers"] = routes
        if not body["configured"]:
            body["message"] = (
                f"No configured provider of model '{job.model.id}' can serve this request; the estimate is for "
                "those that would once configured: "
                + "; ".join(f"{r['config_key']}: {r['unavailable_reason']}" for r in routes)
                + "."
            )
        if principal.stored:
            key = await self.keys.get(principal.key_id or "")
            remaining = key["remaining_usd"]
            body["budget"] = {
                "remaining_usd": remaining,
                "period": key["budget_period"],
                "fits": remaining is None or est.max_micros <= pricing.micros(remaining),
            }
        return body

    def _prospect(self, entry: ProviderEntry, job: ImageJob) -> dict[str, Any]:
        """One provider the dry run priced: whether it is configured, its price and the size it makes."""
        impl = self.router.providers[entry.provider]
        configured = impl.available(entry)
        return {
            "config_key": entry.config_key,
            "provider": entry.provider,
            "configured": configured,
            "price_per_image": entry.pricing.price_per_image(),
            "currency": entry.pricing.currency,
            "size": str(produced_size(entry, job)),
            **({} if configured else {"unavailable_reason": impl.unavailable_reason(entry)}),
        }

    async def _reject(self, exc: GatewayError, request_id: str, call: ImageCall, key_id: str | None, t0: float) -> None:
        """A rejected request is recorded too: the history shows what was asked and why it failed."""
        await self.db.create_request(
            id=request_id,
            endpoint=_endpoint(call),
            model=str(call.fields.get("model") or ""),
            mode=call.mode,
            params=_safe_params(call.fields),
            key_id=key_id,
            input=_clipped(call.input),
            version=call.version,
            rejected={
                "error": {**exc.body()["error"], "status": exc.status, "headers": exc.headers},
                "duration_ms": ms_since(t0),
            },
        )
        exc.headers.setdefault("x-request-id", request_id)

    @staticmethod
    def _authorize(principal: Principal, model_id: str) -> None:
        if principal.models is not None and model_id not in principal.models:
            raise forbidden(
                f"This API key may not use model '{model_id}'; it may use: {', '.join(principal.models)}.",
                param="model",
                code="model_not_allowed",
            )

    async def _rate_limit(self, principal: Principal, n: int) -> None:
        """Requests and images per minute, counted where the settings say (memory, Redis, PostgreSQL)."""
        if principal.key_id is None:
            return
        if principal.ipm is not None and n > principal.ipm:
            raise invalid(
                f"n={n} is more than this API key's limit of {principal.ipm} images per minute.",
                param="n",
                code="n_above_rate_limit",
            )
        for kind, limit, weight, words in (
            ("requests", principal.rpm, 1, "requests per minute"),
            ("images", principal.ipm, n, "images per minute"),
        ):
            if limit is None:
                continue
            admission = await self.limits.hit(f"{kind}:{principal.key_id}", limit, weight)
            if not admission.allowed:
                metrics.rate_limited(kind)
                wait = max(1, int((admission.retry_after_s or 1) + 0.999))
                raise GatewayError(
                    f"Rate limit reached for API key '{principal.name}' ({principal.key_id}) on {words}: "
                    f"limit {limit}. Try again in {wait} s.",
                    status=429,
                    type=kind,
                    code="rate_limit_exceeded",
                    headers={"retry-after": str(wait), f"x-ratelimit-limit-{kind}": str(limit)},
                )

    async def wait(
        self, request_id: str, timeout: float | None = None, *, cancel_on_abandon: bool = True
    ) -> RequestRow:
        """Until the job ends (or `timeout` passes: then the record as it is). Cancelling the
        waiter (the client hung up) cancels the job, unless it is a prediction that goes on, or this
        process is stopping (the server cut the request off: the job is handed back, and finished
        elsewhere)."""
        event = self.channels.completion(request_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                # A job this process runs signals its end; so, on PostgreSQL (store/notices.py) or a
                # watched SQLite file (store/sqlite_watch.py), does one run elsewhere, else it is seen
                # by polling. The long looks are safety nets.
                if self.jobs.runs(request_id):
                    poll = OWN_JOB_POLL_S
                elif self.ends_heard():
                    poll = HEARD_JOB_POLL_S
                else:
                    poll = OTHER_JOB_POLL_BUSY_S if self.jobs.concurrency else OTHER_JOB_POLL_S
                left = poll if deadline is None else min(poll, deadline - time.monotonic())
                if left > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(left):
                            await event.wait()
                record = self.channels.final(request_id) if event.is_set() else None
                record = record or await self.db.get_request(request_id)
                if record is None:
                    raise not_found(f"No request '{request_id}'.", code="request_not_found")
                if record.status in ENDED or (deadline is not None and time.monotonic() >= deadline):
                    return record
        except asyncio.CancelledError:
            if cancel_on_abandon and not self.jobs.draining:
                await asyncio.shield(self.cancel(request_id))
            raise
        finally:
            self.channels.forget(request_id)

    async def cancel(self, request_id: str) -> RequestRow | None:
        record = await self.db.request_cancel(request_id)
        if record is not None and record.status == JobStatus.PROCESSING:
            self.jobs.cancel(request_id)  # ours: at once; another process's: at its next lease renewal
        elif record is not None and record.status == JobStatus.CANCELED and record.webhook:
            # Canceled before any worker took it: no runner will say so (a repeat is ignored).
            await self.events.emit(record, "completed")
        return record

    async def render(self, record: RequestRow, base_url: str) -> ImageOutcome:
        """The OpenAI ImagesResponse for a finished job, or its error."""
        rid = record.id
        if record.status == JobStatus.FAILED:
            error = dict(record.error or {})
            status = int(error.pop("status", 500))
            headers = {"x-request-id": rid, **(error.pop("headers", None) or {})}
            raise GatewayError(
                error.get("message") or "The request failed.",
                status=status,
                type=error.get("type"),
                param=error.get("param"),
                code=error.get("code"),
                headers=headers,
            )
        if record.status == JobStatus.CANCELED:
            raise GatewayError(
                "The request was canceled.", status=499, code="request_canceled", headers={"x-request-id": rid}
            )
        params = record.params
        entry = self.catalog.resolve(record.provider)[1] if record.provider else None
        inline = params.get("response_format") == "b64_json"
        # The bytes are read only when they go into the response: a URL response links to them.
        blobs = [b or b"" for b in await asyncio.gather(*map(self.blobs.get, record.output_blob_ids))] if inline else []
        data = []
        for i, blob_id in enumerate(record.output_blob_ids):
            item: dict[str, Any] = {"revised_prompt": params["prompt"]}
            if inline:
                item["b64_json"] = base64.b64encode(blobs[i]).decode()
            else:
                item["url"] = self.links.blob_url(base_url, blob_id)
            data.append(item)
        body = {
            "created": int(record.created_at.timestamp()),
            "data": data,
            "size": record.output_size,
            "output_format": record.output_format,
            "metadata": {
                "request_id": rid,
                "model": record.model,
                "provider": entry.provider if entry else None,
                "executed_model": record.provider,
                "provider_model_id": entry.provider_model_id if entry else None,
                "cost": record.cost,
                "currency": record.currency,
                "attempts": record.attempts,
                "seed": params.get("seed"),
                "ignored_params": params.get("ignored_params", []),
                # Parameters sent otherwise than asked (a value the route caps): what was sent, and why.
                "adjusted_params": params.get("adjusted_params", {}),
                **({"engine": params["engine"]} if params.get("engine") else {}),
            },
        }
        headers = {"x-request-id": rid, "x-kontext-provider": record.provider or "", "x-kontext-model": record.model}
        return ImageOutcome(body=body, headers=headers, blobs=blobs)

    async def _store_inputs(self, raw: list[bytes]) -> list[str]:
        """Input images as blobs (as uploaded): a job run again after a crash needs them."""
        puts = (self.blobs.put(data, ext=EXTENSIONS[sniff_format(data) or "png"]) for data in raw)
        return list(await asyncio.gather(*puts))

    async def _store_mask(self, mask: Image) -> str:
        return await self.blobs.put(await asyncio.to_thread(encode_image, mask, "png"), ext="png")

    # -- validation and normalisation --------------------------------------------------------------

    async def _prepare(
        self,
        request_id: str,
        call: ImageCall,
        provider: str | None,
        principal: Principal,
        base_url: str,
        *,
        prospective: bool = False,
    ) -> _Prepared:
        if call.invalid is not None or call.params is None:
            raise call.invalid or invalid("The request could not be read.")
        req, mode = call.params, call.mode
        extra = _bounded_passthrough(req.passthrough(PARAM_NAMES | CONTROL_FIELDS))
        model, forced = self.catalog.resolve(req.model or self.settings.default_model)
        self._authorize(principal, model.id)  # before anything else is said about the model
        if mode not in model.modes:
            supported = " and ".join(model.modes)
            raise invalid(
                f"Model '{model.id}' does not support {_mode_words(mode)}; it supports {supported}.",
                param="model",
                code="unsupported_mode",
            )
        if req.n > self.settings.max_n:
            raise invalid(
                f"Invalid 'n': {req.n} is out of range (1 to {self.settings.max_n}).",
                param="n",
                code="integer_out_of_range",
            )
        masks = [await self._read(s, call, base_url, principal) for s in call.masks]
        files = [await self._read(s, call, base_url, principal) for s in call.images]
        files += await self._previous_output(req, principal)
        if masks and mode != "edit":
            raise invalid(
                "A mask needs an image to edit: use /v1/images/edits.", param="mask", code="unsupported_parameter"
            )
        if len(masks) > 1:
            raise invalid("Send one mask (it applies to the first image).", param="mask", code="invalid_value")
        if mode == "edit" and not files:
            raise invalid(
                "An edit needs an input image: send 'image' (a file) or 'images' [{'image_url'}].",
                param="image",
                code="missing_required_parameter",
            )
        if mode == "text-to-image" and files:
            raise invalid(
                "Text-to-image takes no input image; use /v1/images/edits to edit an image.",
                param="image",
                code="unsupported_parameter",
            )
        if len(files) > model.max_input_images:
            raise invalid(
                f"Too many input images: {len(files)} given, model '{model.id}' accepts at most "
                f"{model.max_input_images}.",
                param="image",
                code="too_many_images",
            )
        images = await asyncio.to_thread(self._decode_inputs, files) if files else []  # large decodes off the loop
        mask = None
        if masks:
            mask = await asyncio.to_thread(
                decode_mask, masks[0][1], size=images[0].size, max_pixels=self.settings.max_input_pixels
            )
        input_size = Size(*images[0].size) if images else None
        size = resolve_size(
            model, size=req.size, aspect_ratio=req.aspect_ratio, resolution=req.resolution, input_size=input_size
        )
        job = ImageJob(
            request_id=request_id,
            model=model,
            mode=mode,
            prompt=req.prompt,
            images=images,
            size=size,
            n=req.n,
            seed=req.seed if req.seed is not None else secrets.randbelow(2**32),
            output_format=req.output_format or "png",
            output_compression=req.output_compression,
            guidance=req.cfg_scale,
            steps=req.num_inference_steps,
            extra=extra,
            mask=mask,
            negative_prompt=req.negative_prompt,
            true_cfg_scale=req.true_cfg_scale,
            loras=[lora.model_dump() for lora in req.loras or []],
            partial_images=(req.partial_images or 0) if req.stream else 0,
        )
        # Checked now so that a request nothing can serve fails at once (400 / 503), not in the queue;
        # the candidates, in the order they would be tried, also price it. A dry run (`prospective`)
        # prices those that would serve once configured when none is yet.
        candidates = self.router.candidates(model, mode, job, forced=forced, provider=provider, prospective=prospective)
        return _Prepared(job, forced, req, [data for _, data in files], [entry for entry, _ in candidates])

    def _decode_inputs(self, files: list[tuple[str, bytes]]) -> list[Image]:
        images = []
        for i, (param, data) in enumerate(files):
            param = param if len(files) == 1 else f"{param}[{i}]"
            if len(data) > self.settings.max_file_bytes:
                raise too_large(
                    f"'{param}' is {len(data)} bytes; the limit is {self.settings.max_file_bytes} bytes (50 MB).",
                    param=param,
                    code="file_too_large",
                )
            images.append(decode_image(data, param=param, max_pixels=self.settings.max_input_pixels))
        return images

    async def _read(
        self, source: ImageSource, call: ImageCall, base_url: str, principal: Principal
    ) -> tuple[str, bytes]:
        """(the field it is known by in errors about its pixels, its bytes). Uploaded bytes as they
        are; a data URL decoded; a link of this gateway read from the store; an outside http(s) URL
        fetched when the API allows it (predictions), else refused."""
        kind = "mask" if source.param.startswith("mask") else "image"
        if source.data is not None:
            return kind, source.data
        url, param = source.url or "", source.param
        if url.startswith("data:"):
            return kind, parse_data_url(url, param=param)
        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. an unclosed IPv6 literal, "http://[::1/"
            raise invalid(f"'{param}' is not a valid URL.", param=param, code="invalid_image_url") from None
        if not call.fetch_urls:
            # The Images API reads this gateway's own image links, and fetches nothing else.
            if parts.path.startswith(BLOB_ROUTE):
                data = await self.links.signed_blob(parts.path, parts.query)
                if data is not None:
                    return kind, data
                raise invalid(
                    f"'{param}' is a link of this gateway that has expired or was altered; use "
                    "'previous_response_id' to edit an earlier output.",
                    param=param,
                    code="invalid_image_url",
                )
            raise invalid(
                f"'{param}' must be a data URL (data:image/png;base64,...) or an image link of this gateway.",
                param=param,
                code="invalid_image_url",
            )
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise invalid(f"'{param}' must be an http(s) URL or a data URI.", param=param, code="invalid_image_url")
        if self.links.is_own(parts, base_url):
            data = await self.links.read(parts, principal)
            if data is None:
                raise invalid(
                    "That URL of this gateway names no stored file (or its link has expired).",
                    param="input",
                    code="invalid_image_url",
                )
            return kind, data
        data = await net.fetch_image(
            url,
            param=param,
            allow_private=self.settings.allow_private_urls,
            max_bytes=self.settings.max_file_bytes,
            deadline_s=self.settings.fetch_timeout_s,
        )
        return kind, data

    async def _previous_output(self, req: ImageRequest, principal: Principal) -> list[tuple[str, bytes]]:
        """`previous_response_id`: edit the (first) output of an earlier request, by its id."""
        rid = req.previous_response_id
        if not rid:
            return []
        record = await self.db.get_request(rid)
        if record is None or not principal.owns(record):
            raise GatewayError(
                f"No request '{rid}'.", status=404, param="previous_response_id", code="request_not_found"
            )
        data = await self.blobs.get(record.output_blob_ids[0]) if record.output_blob_ids else None
        if record.status != JobStatus.SUCCEEDED or data is None:
            raise invalid(
                f"Request '{rid}' has no output to edit (it is {record.status}"
                f"{', and its images were purged' if record.purged_at else ''}).",
                param="previous_response_id",
                code="no_previous_output",
            )
        return [("image", data)]


def _endpoint(call: ImageCall) -> str:
    return call.endpoint or ("images.edits" if call.mode == "edit" else "images.generations")


def _refusal(refused: Exception, principal: Principal) -> GatewayError:
    """The 402 / 429 / 401 for what the reservation transaction refused."""
    if isinstance(refused, ledger.BudgetExceeded):
        period = {"day": "daily ", "week": "weekly ", "month": "monthly "}.get(refused.period or "", "")
        left = max(0, refused.budget_micros - refused.spent_micros - refused.reserved_micros)
        return GatewayError(
            f"Insufficient budget for API key '{principal.name}' ({principal.key_id}): this request may cost up to "
            f"${refused.needed_micros / 1e6:.4f}, and ${left / 1e6:.4f} of the ${refused.budget_micros / 1e6:.4f} "
            f"{period}budget is left (${refused.spent_micros / 1e6:.4f} spent, ${refused.reserved_micros / 1e6:.4f} "
            f"held by requests in flight).",
            status=402,
            type="billing_error",
            code="insufficient_budget",
        )
    if isinstance(refused, ledger.ConcurrencyExceeded):
        return GatewayError(
            f"Too many requests at once for API key '{principal.name}' ({principal.key_id}): its limit is "
            f"{refused.limit} running at a time. Try again when one finishes.",
            status=429,
            type="requests",
            code="concurrency_limit_exceeded",
            headers={"retry-after": "1"},
        )
    return GatewayError(
        "This API key has been revoked.", status=401, code="invalid_api_key", headers={"www-authenticate": "Bearer"}
    )


def _mode_words(mode: Mode) -> str:
    return "image editing" if mode == "edit" else "text-to-image generation"


def _safe_params(fields: dict[str, Any]) -> dict[str, Any]:
    """What a rejected request asked for, without binary payloads."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v if not isinstance(v, str) or len(v) <= 2000 else v[:2000] + "..."
    return out


def _clipped(value: Any, limit: int = 2000) -> Any:
    """A rejected request's input as recorded: long strings cut (it may have been refused for one)."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "..."
    if isinstance(value, dict):
        return {k: _clipped(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_clipped(v, limit) for v in value]
    return value


def _bounded_passthrough(extra: dict[str, Any]) -> dict[str, Any]:
    """Parameters the gateway does not know go to the provider as they are, and into the request's
    record: they may take MAX_PASSTHROUGH_BYTES in all."""
    sizes = {k: len(json.dumps(v, default=str)) for k, v in extra.items()}
    if sum(sizes.values()) > MAX_PASSTHROUGH_BYTES:
        name = max(sizes, key=sizes.__getitem__)
        raise invalid(
            f"Unknown parameter '{name}' is {sizes[name]} bytes: parameters this gateway does not know "
            f"are passed to the provider as they are and may take {MAX_PASSTHROUGH_BYTES} bytes in all.",
            param=name,
            code="parameter_too_large",
        )
    return extra
