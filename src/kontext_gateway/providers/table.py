"""How each request parameter reaches each hosted route, found by asking the dialects themselves.

For every route, a request is built twice by its dialect, without and with one parameter set, and the
fields that differ are the ones that parameter became; their published type and range come from the
route's contract. So the table in the providers docs (`kontext providers` prints it) is what the code
sends, not a description of it that could drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from ..catalog import Catalog, ProviderEntry
from ..config import Settings
from ..params import Size, SizeRequest
from .base import ImageJob
from .dialect import Dialect, Submission
from .routes import Route

Change = Callable[[ImageJob], ImageJob]

# Each parameter, and how a request that sets it differs from the baseline request.
PROBES: dict[str, Change] = {
    "seed": lambda job: replace(job, seed=7),
    "size": lambda job: replace(job, size=SizeRequest(Size(1536, 1024), exact=True)),
    "aspect_ratio": lambda job: replace(job, size=SizeRequest(Size(1184, 880), aspect_ratio="4:3", tier="1K")),
    "output_format": lambda job: replace(job, output_format="jpeg"),
    "output_compression": lambda job: replace(job, output_compression=50),
    "cfg_scale": lambda job: replace(job, guidance=3.0),
    "num_inference_steps": lambda job: replace(job, steps=20),
}
ORDER = ("prompt", "image", "n", *PROBES)
EXTRAS: dict[str, Any] = {  # the catalog's provider parameters, with a value each route may take
    "safety_tolerance": 2,
    "prompt_upsampling": True,
    "enhance_prompt": True,
    "sync_mode": False,
    "acceleration": "regular",
    "resolution_mode": "auto",
    "disable_safety_checker": False,
    "enable_safety_checker": True,
    "output_quality": 90,
}


@dataclass(frozen=True)
class RouteCase:
    entry: ProviderEntry
    images: int  # input images: the route depends on it

    @property
    def mode(self) -> str:
        return "edit" if self.images else "text-to-image"


def route_cases(catalog: Catalog, dialects: dict[str, Dialect]) -> Iterator[tuple[RouteCase, Route]]:
    """Each distinct published route the catalog's hosted entries reach, with the request reaching it
    with the most input images (so that the image fields show)."""
    found: dict[tuple[str, str], tuple[RouteCase, Route]] = {}
    for model in catalog.models:
        for entry in model.providers:
            dialect = dialects.get(entry.provider)
            if dialect is None:
                continue
            for images in range(entry.max_input_images + 1):
                case = RouteCase(entry, images)
                if entry.modes is not None and case.mode not in entry.modes:
                    continue
                job = _job(catalog, entry, images)
                if dialect.unsupported(entry, job) is not None:
                    continue
                target = dialect.route(entry, job)
                found[(entry.provider, target.id)] = (case, target)  # the later, the more images
    yield from found.values()


def markdown(settings: Settings | None = None, catalog: Catalog | None = None) -> str:
    """One table per provider: rows are request parameters, columns its routes."""
    from . import DIALECTS

    settings = settings or Settings()
    catalog = catalog or Catalog.load(settings.catalog_path)
    dialects = {d.name: d(settings) for d in DIALECTS}
    by_provider: dict[str, list[tuple[RouteCase, Route]]] = {}
    for case, target in route_cases(catalog, dialects):
        by_provider.setdefault(case.entry.provider, []).append((case, target))
    out: list[str] = []
    for name, routes in by_provider.items():
        dialect = dialects[name]
        columns = [_cells(dialect, catalog, case, target) for case, target in routes]
        params = list(dict.fromkeys([*ORDER, *(p for cells in columns for p in cells)]))
        params = [p for p in params if any(p in cells for cells in columns)]
        out.append(f"**{name}**\n")
        out.append("| Parameter | " + " | ".join(f"`{t.id}`" for _, t in routes) + " |")
        out.append("|---|" + "---|" * len(routes))
        for param in params:
            out.append(f"| `{param}` | " + " | ".join(cells.get(param, "—") for cells in columns) + " |")
        notes = [f"`{t.id}`: {t.note}." for _, t in routes if t.note]
        out.append("")
        if notes:
            out.extend([*notes, ""])
    return "\n".join(out).rstrip() + "\n"


def _cells(dialect: Dialect, catalog: Catalog, case: RouteCase, target: Route) -> dict[str, str]:
    """Parameter -> what the route's body carries it as, with the route's published range."""
    base = _job(catalog, case.entry, case.images)
    before = _body(dialect.submit(case.entry, base, 1, _stand_ins(case.images)))
    cells: dict[str, str] = {"prompt": _describe(target, ["prompt"])}
    if case.images:
        plan = dialect.submit(case.entry, base, 1, _stand_ins(case.images))
        fields = [k for k, v in _body(plan).items() if isinstance(v, (str, list)) and _is_image(v)]
        limit = dialect.inline_limit
        how = "inline" if limit is None else f"inline up to {limit // 1024} KB base64, else uploaded"
        cells["image"] = ", ".join(f"`{f}`" for f in fields) + f" ({how})"
    n_plan = dialect.submit(case.entry, replace(base, n=2), min(2, dialect.batch_limit), _stand_ins(case.images))
    changed = _diff(before, _body(n_plan))
    cells["n"] = _describe(target, changed) if changed else "one task per image, in parallel"
    for param, change in PROBES.items():
        plan = dialect.submit(case.entry, change(base), 1, _stand_ins(case.images))
        changed = _diff(before, _body(plan))
        cells[param] = _describe(target, changed) if changed else "— (ignored)"
        if param == "output_format" and not changed:
            cells[param] = _describe(target, ["output_format"])  # always sent: png unless asked
    for param, value in EXTRAS.items():
        job = replace(base, extra={param: value})
        plan = dialect.submit(case.entry, job, 1, _stand_ins(case.images))
        changed = _diff(before, _body(plan))
        if param in plan.ignored or not changed:
            continue  # not this route's: omitted, so each table lists what the provider takes
        cells[param] = _describe(target, changed)
    return cells


def _describe(target: Route, fields: list[str]) -> str:
    return "; ".join(f"`{f}` ({target.allowed(f)})" for f in fields)


def _diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def _body(plan: Submission) -> dict[str, Any]:
    body = plan.call.json or {}
    return dict(body.get("input", body)) if isinstance(body, dict) else {}


def _stand_ins(images: int) -> list[str]:
    return [f"https://inputs.invalid/{i}.jpeg" for i in range(images)]


def _is_image(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, str) and v.startswith("https://inputs.invalid/") for v in values)


def _job(catalog: Catalog, entry: ProviderEntry, images: int) -> ImageJob:
    model = next(m for m in catalog.models if entry in m.providers)
    return ImageJob(
        request_id="table",
        model=model,
        mode="edit" if images else "text-to-image",
        prompt="a lighthouse",
        images=[Image.new("RGB", (64, 48))] * images,
        size=SizeRequest(None),
        n=1,
        seed=1,
        output_format="png",
        output_compression=None,
    )
