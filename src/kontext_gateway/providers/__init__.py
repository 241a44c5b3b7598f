"""Providers: the local engine, and the hosted upstreams, each one dialect (what to send, what an
answer means) spoken by the one executor, `HostedProvider`."""

from __future__ import annotations

from .bfl import BFL
from .dialect import Dialect
from .fal import Fal
from .fireworks import Fireworks
from .replicate import Replicate

# Every hosted upstream the gateway can route to; a new one is one more dialect file and one entry here.
DIALECTS: tuple[type[Dialect], ...] = (Replicate, Fal, Fireworks, BFL)
