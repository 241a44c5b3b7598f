"""The FastAPI application: routers, error envelope, body limit, and the gateway's lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from .. import __version__
from ..config import Settings
from ..gateway import Gateway
from . import (
    admin,
    auth,
    blobs,
    docs,
    errors,
    files,
    health,
    history,
    images,
    metrics_route,
    models,
    openapi,
    predictions,
    web,
    webhooks,
)
from .headers import SecurityHeadersMiddleware
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .trusted import CORS_EXPOSED, CORS_HEADERS, CORS_METHODS, TrustedRequestMiddleware, TrustPolicy

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, on_started: Callable[[], object] | None = None) -> FastAPI:
    """The application; `on_started` runs once the gateway has started, before the server listens (the
    CLI's process settles its garbage collector there)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway(settings)
        await gateway.start()
        app.state.gateway = gateway
        app.state.model_views = models.ModelViews(gateway)
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(
        title="Kontext Gateway",
        version=__version__,
        description="OpenAI-compatible image API for the FLUX.1 Kontext family.",
        lifespan=lifespan,
        docs_url=None,  # /docs is served from the bundled swagger-ui (api/docs.py), not a CDN
        # A path with a trailing slash is a 404 in the envelope, not an empty 307 that clients would
        # follow with (or without) their body.
        redirect_slashes=False,
        redoc_url=None,
    )
    errors.install(app)
    app.include_router(models.router)
    app.include_router(images.router)
    app.include_router(blobs.router)
    app.include_router(predictions.router)
    app.include_router(files.router)
    app.include_router(webhooks.router)
    app.include_router(history.router)
    app.include_router(admin.router, dependencies=[Depends(auth.require_admin)])
    app.include_router(metrics_route.router)
    app.include_router(health.router)
    app.include_router(web.router)
    app.mount("/static", web.static, name="static")
    app.include_router(docs.router)
    app.mount("/docs/assets", docs.assets, name="docs-assets")
    # The bodies the routes read themselves, the errors they answer, and none of FastAPI's guessed 422s.
    app.openapi = openapi.build(app)  # type: ignore[method-assign]

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Every /v1 route needs a key once the gateway is keyed, except blob links; admin routes an admin key.
    app.add_middleware(auth.AuthMiddleware)
    policy = TrustPolicy.from_settings(settings)
    if policy.any_host:
        log.warning(
            "serving on %s and answering any Host header: set KONTEXT_ALLOWED_HOSTS (or "
            "KONTEXT_PUBLIC_URL) to the names clients use, so a DNS-rebinding page cannot reach "
            "this gateway through its own name",
            settings.host,
        )
    if policy.origins:  # answers the trusted origins' preflights; their responses carry CORS headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sorted(policy.origins),
            allow_methods=CORS_METHODS,
            allow_headers=CORS_HEADERS,
            expose_headers=CORS_EXPOSED,
            max_age=600,
        )
    # Before anything is read or answered: an untrusted Host, or another site's page changing something.
    app.add_middleware(TrustedRequestMiddleware, policy=policy)
    app.add_middleware(MetricsMiddleware)  # outermost but for the headers: counts 413s, 400s and 403s too
    # Around everything, Starlette's own error handler included: the errors middleware answer (400,
    # 401, 413...) and an unexpected 500 get the security headers too.
    build_stack = app.build_middleware_stack
    app.build_middleware_stack = lambda: SecurityHeadersMiddleware(  # type: ignore[method-assign]
        build_stack(), public_url=settings.public_url
    )
    return app
