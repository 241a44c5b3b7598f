"""All four upstream fakes together, and gateway settings pointing at them (for routing tests), or at
one of them alone (for a provider's own tests).

A fake may answer from more than one host (BFL's polling cluster, fal's storage): the settings name
those origins in `provider_hosts`, as an operator would for a regional mirror, so the gateway sends the
provider's key there too, and nowhere else."""

from __future__ import annotations

from collections.abc import Sequence
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
    provider: str,
    data_dir: Path,
    base_url: str,
    *,
    key: str | None = None,
    hosts: Sequence[str] = (),
    **overrides: Any,
) -> Settings:
    """A gateway whose only upstream is `provider` at `base_url`, with its fake's key (or `key`): no other
    provider's key, no local weights, quick polls. `hosts`: the fake's other origins that take the key
    (`fake.other_origins`)."""
    setting, default_key = KEYS[provider]
    provider_hosts = dict(overrides.pop("provider_hosts", {}))
    if hosts:
        provider_hosts[provider] = [*provider_hosts.get(provider, []), *hosts]
    fields: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": f"sqlite:///{data_dir / 'gateway.db'}",
        "dev_weights_dir": None,
        "provider_hosts": provider_hosts,
        **{KEYS[other][0]: None for other in KEYS if other != provider},
        setting: key or default_key,
        BASE_URLS[provider]: base_url,
        **FAST,
        **overrides,
    }
    return Settings(**fields)


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

    def hosts(self) -> dict[str, list[str]]:
        """`provider_hosts` for the fakes as they run now: each one's other origins that take its key."""
        return {name: fake.other_origins for name, fake in self.all.items() if fake.other_origins}

    def settings(self, data_dir: Path, **overrides: Any) -> Settings:
        provider_hosts = {**self.hosts(), **overrides.pop("provider_hosts", {})}
        storage = {"fal_storage_url": self.fal.storage_url} if self.fal.storage_url else {}
        fields: dict[str, Any] = {
            "data_dir": data_dir,
            "provider_hosts": provider_hosts,
            **storage,
            **dict(KEYS.values()),
            **{BASE_URLS[name]: url for name, url in self.urls.items()},
            **FAST,
            **overrides,
        }
        return Settings(**fields)
