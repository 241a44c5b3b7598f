"""The web face: playground, gallery, model pages and compare, served by the gateway itself.

Plain HTML, CSS and JavaScript modules from `kontext_gateway/web/` (no build step): one page that
routes on the URL path, talking to the same public API as any client (with the key a person types
in, kept in the browser's session storage, when the gateway is keyed).

They run under a Content-Security-Policy that allows this origin only (api/headers.py): no inline
script or style (no `style` attributes either: classes in app.css), no eval, nothing from elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
PAGES = ("/", "/playground", "/gallery", "/compare", "/models", "/models/{model_id:path}")

router = APIRouter(include_in_schema=False)


def _index() -> FileResponse:
    # no-cache: the page is tiny and must match the API of the server it comes from after an upgrade
    return FileResponse(WEB_DIR / "index.html", headers={"cache-control": "no-cache"})


for _path in PAGES:
    router.add_api_route(_path, _index, methods=["GET"])


class _Static(StaticFiles):
    """The page's modules revalidate like the page itself (ETag: a 304 when unchanged), so a browser
    never runs old JavaScript against an upgraded server."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["cache-control"] = "no-cache"
        return response


static = _Static(directory=WEB_DIR)
