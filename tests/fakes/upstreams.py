"""All four upstream fakes together, and gateway settings pointing at them (for routing tests), or at
one of them alone (for a provider's own tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fakes.bfl import FakeBFL
from fakes.fal import FakeFal
from fakes.fireworks import FakeFireworks
from fakes.replicate import FakeReplicate
from kontext_gateway.config import Settings

# Quick polls and backoffs against fakes on loopback; the upstream timeout is only a backstop against a
# hang (no test waits for it), so generous: a busy machine is slow, not broken.
FAST = dict(upstream_poll_interval_s=0.01, upstream_backoff_s=0.01, upstream_backoff_max_s=0.05, upstream_timeout_s=120)
# Each provider's settings for its key and base URL, and the key its fake takes by default.
KEYS = {
    "replicate": ("replicate_api_token", "r8_test"),
    "fal": ("fal_key", "fal_test"),
    "fireworks": ("fireworks_api_key", "fw_test"),
    "bfl": ("bfl_api_key", "bfl_test"),
}
BASE_URLS = {name: f"{name}_base_url" for name in KEYS}


def solo_settings(
    provider: str, data_dir: Path, base_url: str, *, key: str | None = None, **overrides: Any
) -> Settings:
    """A gateway whose only upstream is `provider` at `base_url`, with its fake's key (or `key`): no other
    provider's key, no local weights, quick polls."""
    setting, default_key = KEYS[provider]
    return Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'gateway.db'}",
        dev_weights_dir=None,
        **{KEYS[other][0]: None for other in KEYS if other != provider},
        **{setting: key or default_key, BASE_URLS[provider]: base_url},
        **{**FAST, **overrides},
    )


class Upstreams:
    def __init__(self) -> None:
        self.replicate = FakeReplicate(pending_polls=1)
        self.fal = FakeFal(pending_polls=1)
        self.fireworks = FakeFireworks(pending_polls=1)
        self.bfl = FakeBFL(pending_polls=1, run_s=0.0)
        self.urls: dict[str, str] = {}

    @property
    def all(self) -> dict[str, Any]:
        return {"replicate": self.replicate, "fal": self.fal, "fireworks": self.fireworks, "bfl": self.bfl}

    def reset(self) -> None:
        for fake in self.all.values():
            fake.reset()

    def submits(self, name: str) -> int:
        return len(self.all[name].submits())

    def settings(self, data_dir: Path, **overrides: Any) -> Settings:
        return Settings(
            data_dir=data_dir,
            **dict(KEYS.values()),
            **{BASE_URLS[name]: url for name, url in self.urls.items()},
            **{**FAST, **overrides},
        )
