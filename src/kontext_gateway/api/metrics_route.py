"""GET /metrics: the Prometheus text exposition (see metrics.py for the series and multiprocess mode)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .. import metrics
from .deps import gateway

router = APIRouter()
log = logging.getLogger(__name__)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    gw = gateway(request)
    # The queue depth is counted now, when someone asks, rather than polled all the time.
    try:
        metrics.queue_depth(await gw.db.count_waiting())
    except Exception:
        log.warning("counting waiting jobs for /metrics failed", exc_info=True)
    # Multiprocess mode reads and merges files: off the event loop.
    body, content_type = await asyncio.to_thread(metrics.render)
    return Response(body, media_type=content_type)
