"""GET /v1/models and /v1/models/{id}: the catalog in the OpenAI shape, plus its own fields."""

from __future__ import annotations

import json
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..catalog import ModelSpec
from ..errors import invalid
from ..gateway import Gateway
from ..params import compile_schema
from ..pixel_budget import budget
from . import openapi
from .deps import gateway

router = APIRouter()


def model_object(gw: Gateway, m: ModelSpec) -> dict[str, Any]:
    providers = []
    for e in m.providers:
        impl = gw.providers.get(e.provider)
        providers.append(
            {
                "provider": e.provider,
                "config_key": e.config_key,
                "provider_model_id": e.provider_model_id,
                "modes": list(e.modes or m.modes),
                "max_input_images": e.max_input_images,
                # The ratios its routes take and the formats they make natively (absent: the model's
                # ratios, and any format).
                **({"aspect_ratios": list(e.aspect_ratios)} if e.aspect_ratios else {}),
                **({"output_formats": list(e.output_formats)} if e.output_formats else {}),
                "max_request_pixels": budget(gw.settings, e),
                "available": bool(impl and impl.available(e)),
                "pricing": e.pricing.model_dump(mode="json", exclude_none=True),
            }
        )
    body = m.model_dump(mode="json", exclude={"providers", "params", "released"}, exclude_none=True)
    return {
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": m.owned_by,
        **{k: v for k, v in body.items() if k not in ("id", "owned_by")},
        "released": m.released.isoformat(),
        "providers": providers,
        "provider_params": [p.model_dump(mode="json", exclude_none=True) for p in m.params],
        "schema_url": f"/v1/models/{m.id}?schema=true",
    }


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


class ModelViews:
    """The catalog is static for a process's life: render each view once and serve the bytes."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        objects = {m.id: model_object(gw, m) for m in gw.catalog.models}
        self.list_body = _json({"object": "list", "data": list(objects.values())})
        self.one = {mid: _json(obj) for mid, obj in objects.items()}
        self.schemas = {
            m.id: _json(
                {**objects[m.id], "schema": compile_schema(m, gw.router.handlings(m), gw.router.pixel_budgets(m))}
            )
            for m in gw.catalog.models
        }


def _views(request: Request) -> ModelViews:
    return cast(ModelViews, request.app.state.model_views)


@router.get("/v1/models", responses=openapi.MODEL_LIST)
async def list_models(request: Request) -> Response:
    return Response(_views(request).list_body, media_type="application/json")


@router.get("/v1/models/{model_id:path}/stats", responses=openapi.MODEL_STATS)
async def model_stats(request: Request, model_id: str, days: float = 7.0) -> dict[str, Any]:
    """What this gateway observed per provider of the model: success rate, latency p50 / p95."""
    if not 0 < days <= 365:
        raise invalid("'days' must be between 0 and 365.", param="days", code="invalid_value")
    return await gateway(request).history.model_stats(model_id, days)


@router.get("/v1/models/{model_id:path}", responses=openapi.MODEL)
async def get_model(request: Request, model_id: str, schema: bool = False) -> Response:
    views = _views(request)
    model = views.gw.catalog.get(model_id)  # aliases and provider keys resolve; unknown -> 404
    body = views.schemas[model.id] if schema else views.one[model.id]
    return Response(body, media_type="application/json")
