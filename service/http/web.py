"""The pages for browsers: the web page at `/` and the API docs at `/docs`, each served with its
scripts and styles from installed files, so both work on a machine without the internet."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from swagger_ui_bundle import swagger_ui_path

STATIC = Path(__file__).parent / "static"
SWAGGER_UI = Path(str(swagger_ui_path))
PAGE_ASSETS = "/static/web"
DOCS_ASSETS = "/static/docs"

# Each file served is named here: no path parameter, so no path reaches the file system.
_FILES = {
    f"{PAGE_ASSETS}/app.js": (STATIC / "app.js", "text/javascript"),
    f"{PAGE_ASSETS}/style.css": (STATIC / "style.css", "text/css"),
    f"{PAGE_ASSETS}/favicon.svg": (STATIC / "favicon.svg", "image/svg+xml"),
    f"{DOCS_ASSETS}/swagger-ui-bundle.js": (SWAGGER_UI / "swagger-ui-bundle.js", "text/javascript"),
    f"{DOCS_ASSETS}/swagger-ui.css": (SWAGGER_UI / "swagger-ui.css", "text/css"),
}

router = APIRouter(include_in_schema=False)


def _file(path: Path, media_type: str) -> Callable[[], Awaitable[FileResponse]]:
    async def serve() -> FileResponse:
        return FileResponse(path, media_type=media_type)  # with ETag and Last-Modified

    return serve


for route, (path, media_type) in _FILES.items():
    router.add_api_route(route, _file(path, media_type), methods=["GET"])


@router.get("/")
async def page() -> FileResponse:
    """Choose a model, upload a photo, see its classes, its attention and what it cost."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    """Swagger UI on the app's OpenAPI schema, its script and style from the swagger-ui-bundle
    package (FastAPI's default page loads them from a CDN and is blank offline)."""
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{PAGE_ASSETS}/favicon.svg",
    )
