"""How a route reaches the gateway's parts: one typed accessor (the gateway the app's lifespan built)."""

from __future__ import annotations

from typing import cast

from fastapi import Request

from ..gateway import Gateway


def gateway(request: Request) -> Gateway:
    return cast(Gateway, request.app.state.gateway)
