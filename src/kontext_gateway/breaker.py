"""A circuit breaker per (provider, model): takes a failing provider out of rotation, probes it back in.

Closed: requests flow; `failures` consecutive failures open it. Open: the provider is skipped for
`reset_s`. Then half-open: one request goes through as a probe; success closes the breaker, failure
opens it again for another `reset_s`. State is in memory, per process; each change of a key's state
is published as the `kontext_circuit_state` gauge (see metrics.py), unless `publish` is off: a
breaker kept as the fallback of a shared one (provider_health/shared.py) leaves the gauge to that.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import metrics


class Admission(enum.Enum):
    """How allow() let a request through: the breaker is closed, or the request is the one probe of a
    half-open breaker. Only the probe has something to give back (release()) when it ends without a
    verdict on the provider; a request let through while closed never does."""

    CLOSED = "closed"
    PROBE = "probe"


@dataclass
class _State:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


class CircuitBreaker:
    def __init__(
        self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic, *, publish: bool = True
    ) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self.clock = clock
        self.publish = publish
        self._states: dict[str, _State] = {}
        self._published: dict[str, str] = {}  # key -> state last set on the gauge

    def _publish(self, key: str) -> None:
        """Set the gauge when the key's state changed (open -> half-open happens with time, so it is
        seen at the next allow())."""
        if not self.publish:
            return
        state = self.state(key)
        if self._published.get(key) != state:
            self._published[key] = state
            metrics.circuit(key, state)

    def state(self, key: str) -> str:
        s = self._states.get(key)
        if s is None or s.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - s.opened_at >= self.reset_s else "open"

    def allow(self, key: str) -> Admission | None:
        """How a request may go to `key` now, or None when it may not. In half-open state, only one
        probe at a time."""
        self._publish(key)
        state = self.state(key)
        if state == "closed":
            return Admission.CLOSED
        if state == "open":
            return None
        s = self._states[key]
        if s.probing:
            return None
        s.probing = True
        return Admission.PROBE

    def success(self, key: str) -> None:
        self._states.pop(key, None)
        self._publish(key)

    def failure(self, key: str) -> None:
        s = self._states.setdefault(key, _State())
        s.failures += 1
        if s.probing or s.failures >= self.threshold:
            s.opened_at = self.clock()
            s.probing = False
        self._publish(key)

    def release(self, key: str) -> None:
        """The probe (only the request allow() admitted as Admission.PROBE) ended neither in success nor
        in a provider failure (e.g. moderation): another request may probe."""
        if key in self._states:
            self._states[key].probing = False
