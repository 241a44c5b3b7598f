"""Providers: the local engine and one adapter file per hosted upstream."""

from __future__ import annotations

import importlib

from .remote import RemoteProvider

# One module per upstream; each defines exactly one RemoteProvider subclass named in ADAPTERS.
ADAPTERS = {
    "replicate": "kontext_gateway.providers.replicate:ReplicateProvider",
    "fal": "kontext_gateway.providers.fal:FalProvider",
    "fireworks": "kontext_gateway.providers.fireworks:FireworksProvider",
    "bfl": "kontext_gateway.providers.bfl:BFLProvider",
}


def remote_adapters() -> list[type[RemoteProvider]]:
    """The adapter classes present in this build (a missing module is skipped, not an error)."""
    found = []
    for spec in ADAPTERS.values():
        module, _, cls = spec.partition(":")
        try:
            found.append(getattr(importlib.import_module(module), cls))
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return found
