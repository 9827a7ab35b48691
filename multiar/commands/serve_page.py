"""The page of `multiar serve` (GET /): one HTML page, its CSS and its JS, all files inside the package
(multiar/commands/static), served by name from a fixed list; the browser's own APIs only, nothing fetched
from elsewhere (the Content-Security-Policy header says so to the browser too). The page talks to the
API like any client; these routes need no key (they hold no data), the API routes do."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

MEDIA = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
# the page may reach its own origin only: scripts, styles, fetches, and blob: / data: for what it makes
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' blob: data:; media-src 'self' blob:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every static file by name: its bytes and media type (read once, at app creation)."""
    folder = resources.files("multiar.commands") / "static"
    out = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in MEDIA:
            out[item.name] = (item.read_bytes(), f"{MEDIA[suffix]}; charset=utf-8")
    return out


def page_response(body: bytes, media: str) -> Response:
    headers = {
        "Content-Security-Policy": POLICY,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    return Response(body, media_type=media, headers=headers)


def add_page_routes(app: FastAPI) -> None:
    """GET / (index.html) and GET /static/{name} for the other files."""
    files = static_files()

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return page_response(*files["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in files:
            return JSONResponse({"error": {"message": "no such file", "type": "not_found_error"}}, 404)
        return page_response(*files[name])
