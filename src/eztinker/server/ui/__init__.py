"""The web dashboard: static pages served by the server itself (no CDN, nothing fetched from the
internet), which call the same REST and OpenAI-compatible routes as any client, with the key the
user enters (kept in the browser's session storage)."""

from __future__ import annotations

import html
import logging
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PREFIX = "/ui"
DOCS = "/docs"


def mount_dashboard(app) -> None:
    """`/ui/` (the page), `/ui/static/...` (its scripts, styles and the vendored charting
    library) and `/` redirecting to it. The page holds no data: every call it makes needs a key
    when the server has keys."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/")

    @router.get(f"{PREFIX}/")
    def index() -> FileResponse:
        # no-cache: a browser revalidates the page after an upgrade instead of keeping an old one.
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC), name="dashboard-static")


def mount_api_docs(app) -> None:
    """`/docs`: Swagger UI over the OpenAPI schema, its scripts and styles served from the
    installed `fastapi-offline` package (FastAPI's own page loads them from a CDN, on the same
    origin as the dashboard's key), started by a script file of ours, so that the page's CSP
    allows no inline script. Call with the app created with `docs_url=None, redoc_url=None`."""
    try:
        import fastapi_offline
    except ImportError:
        log.warning("/docs is off: install fastapi-offline (it ships Swagger UI's assets)")
        return
    assets = Path(fastapi_offline.__file__).parent / "static"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(app.title)} - API docs</title>
<link rel="stylesheet" href="{DOCS}/static/swagger-ui.css"></head>
<body data-openapi="{html.escape(app.openapi_url or "/openapi.json")}"><div id="swagger-ui"></div>
<script src="{DOCS}/static/swagger-ui-bundle.js"></script>
<script src="{PREFIX}/static/api-docs.js"></script></body></html>"""

    router = APIRouter(include_in_schema=False)

    @router.get(DOCS)
    def docs() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    app.include_router(router)
    app.mount(f"{DOCS}/static", StaticFiles(directory=assets), name="api-docs-static")
