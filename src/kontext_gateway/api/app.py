"""The FastAPI application: routers, error envelope, body limit, and the gateway's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from .. import __version__
from ..config import Settings
from ..gateway import Gateway
from . import admin, auth, blobs, web, errors, files, images, metrics_route, models, predictions, webhooks
from . import history
from .middleware import BodyLimitMiddleware, MetricsMiddleware


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway(settings)
        await gateway.start()
        app.state.gateway = gateway
        app.state.model_views = models.ModelViews(gateway)
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(
        title="Kontext Gateway",
        version=__version__,
        description="OpenAI-compatible image API for the FLUX.1 Kontext family.",
        lifespan=lifespan,
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
    app.include_router(web.router)
    app.mount("/static", web.static, name="static")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Every /v1 route needs a key once the gateway is keyed, except blob links; admin routes an admin key.
    app.add_middleware(auth.AuthMiddleware)
    app.add_middleware(MetricsMiddleware)  # outermost: counts 413s from the body limit too
    return app
