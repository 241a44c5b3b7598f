"""What a request costs: the estimate before it runs, and the actual cost once it has.

Money is integer micros of USD (1e-6) everywhere it is added up, so ledger totals are exact; the
API shows USD floats derived from them. Prices come from the catalog's pricing components.

- Estimate: price per image of the provider that would be tried first, times `n` (what `dryRun`
  shows and what a successful request is charged), and the worst case over every candidate the
  request may fail over to (what is reserved against a budget, so failover cannot overspend it).
- Actual: from the attempts, one line per provider used: images produced at that provider's price,
  plus images an upstream made and billed but the gateway could not use (a download that failed),
  at their true price. Attempts that produced nothing cost nothing: no upstream here bills them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .catalog import Catalog, ProviderEntry

if TYPE_CHECKING:
    from .providers.base import Attempt

MICROS = 1_000_000


def micros(usd: float) -> int:
    return round(usd * MICROS)


def usd(amount_micros: int | None) -> float | None:
    return None if amount_micros is None else amount_micros / MICROS


@dataclass
class Estimate:
    provider: str  # config key of the provider tried first
    currency: str
    total_micros: int  # on that provider
    max_micros: int  # on the most expensive candidate: what is reserved
    components: list[dict[str, Any]] = field(default_factory=list)

    def body(self, model: str) -> dict[str, Any]:
        """The dry-run response (Lumenfall's shape, amounts in micros)."""
        return {
            "object": "cost_estimate",
            "estimated": True,
            "model": model,
            "provider": self.provider,
            "total_cost_micros": self.total_micros,
            "max_cost_micros": self.max_micros,
            "total_cost": usd(self.total_micros),
            "currency": self.currency,
            "components": self.components,
        }


def estimate(entries: list[ProviderEntry], n: int) -> Estimate:
    """`entries` in the order the router would try them (at least one)."""
    first = entries[0]
    components = [
        {
            "type": c.type,
            "metric": c.metric,
            "quantity": n,
            "billable_quantity": n,
            "unit_price": c.unit_price,
            "total_cost": micros(c.unit_price) * n,
        }
        for c in first.pricing.components
        if c.metric == "image"
    ]
    return Estimate(
        provider=first.config_key,
        currency=first.pricing.currency,
        total_micros=_image_price(first) * n,
        max_micros=max(_image_price(e) for e in entries) * n,
        components=components,
    )


def actual(attempts: Iterable[Attempt | dict[str, Any]], catalog: Catalog) -> tuple[int, list[dict[str, Any]]]:
    """(micros, line items) for what the attempts made and were billed for."""
    billed: dict[str, int] = defaultdict(int)
    for a in attempts:
        a = a if isinstance(a, dict) else a.to_dict()
        images = a.get("images", 0) if a.get("outcome") == "succeeded" else a.get("billed_images", 0)
        if images:
            billed[a["config_key"]] += images
    lines: list[dict[str, Any]] = []
    total = 0
    for config_key, images in billed.items():
        entry = catalog.resolve(config_key)[1]
        unit = _image_price(entry) if entry is not None else 0
        lines.append(
            {
                "provider": config_key,
                "metric": "image",
                "quantity": images,
                "unit_price": usd(unit),
                "total_cost": unit * images,
            }
        )
        total += unit * images
    return total, lines


def _image_price(entry: ProviderEntry) -> int:
    return sum(micros(c.unit_price) for c in entry.pricing.components if c.metric == "image")
