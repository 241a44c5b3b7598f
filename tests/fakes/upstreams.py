"""All four upstream fakes together, and gateway settings pointing at them (for routing tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fakes.bfl import FakeBFL
from fakes.fal import FakeFal
from fakes.fireworks import FakeFireworks
from fakes.replicate import FakeReplicate
from kontext_gateway.config import Settings

FAST = dict(upstream_poll_interval_s=0.01, upstream_backoff_s=0.01, upstream_backoff_max_s=0.05, upstream_timeout_s=10)


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
            fake.faults.clear()
            fake.requests.clear()

    def submits(self, name: str) -> int:
        return len(self.all[name].submits())

    def settings(self, data_dir: Path, **overrides: Any) -> Settings:
        return Settings(
            data_dir=data_dir,
            replicate_api_token="r8_test",
            replicate_base_url=self.urls["replicate"],
            fal_key="fal_test",
            fal_base_url=self.urls["fal"],
            fireworks_api_key="fw_test",
            fireworks_base_url=self.urls["fireworks"],
            bfl_api_key="bfl_test",
            bfl_base_url=self.urls["bfl"],
            **{**FAST, **overrides},
        )
