"""The web dashboard: static pages served by the server itself (no CDN, nothing fetched from the
internet), which call the same REST and OpenAI-compatible routes as any client, with the key the
user enters (kept in the browser's session storage)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PREFIX = "/ui"


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
