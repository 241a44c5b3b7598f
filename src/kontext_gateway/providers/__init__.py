"""Providers: the local engine and one adapter file per hosted upstream."""

from __future__ import annotations

from .bfl import BFLProvider
from .fal import FalProvider
from .fireworks import FireworksProvider
from .remote import RemoteProvider
from .replicate import ReplicateProvider


def remote_adapters() -> list[type[RemoteProvider]]:
    """Every hosted upstream the gateway can route to; a new one is one more file and one line here."""
    return [ReplicateProvider, FalProvider, FireworksProvider, BFLProvider]
