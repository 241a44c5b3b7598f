"""GET /docs: the API reference (Swagger UI over /openapi.json), served whole by the gateway.

Swagger UI's files come from the `fastapi-offline` package (Swagger UI 5, which reads the OpenAPI
3.1 that FastAPI writes), not from a CDN: the page works offline, is the version pinned in
pyproject.toml, and runs under the pages' Content-Security-Policy: no inline script, the page is
`web/docs.html` and its start-up `web/docs.js`. Only the two files the page loads are served, under
/docs/assets/. No /redoc: ReDoc injects its styles inline, which that policy refuses.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from .web import WEB_DIR

ASSETS = frozenset({"swagger-ui-bundle.js", "swagger-ui.css"})

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def docs_page() -> FileResponse:
    return FileResponse(WEB_DIR / "docs.html", headers={"cache-control": "no-cache"})


class _Assets(StaticFiles):
    """The files of ASSETS (with ETag and 304, like /static), and nothing else of the package."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if path not in ASSETS:
            raise HTTPException(status_code=404)
        response = await super().get_response(path, scope)
        response.headers["cache-control"] = "no-cache"  # an upgraded package shows at once
        return response


assets = _Assets(directory=Path(str(files("fastapi_offline") / "static")))
