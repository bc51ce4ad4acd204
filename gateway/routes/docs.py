"""The API documentation page, `GET /docs`: Swagger UI whose script, style sheet and icon come from
the installed `swagger-ui-bundle` package (served under /docs/assets), so the page works offline.
Left out of the OpenAPI document, like the web UI."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse
from swagger_ui_bundle import swagger_ui_path

ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")

router = APIRouter()


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request):
    app = request.app
    return get_swagger_ui_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} - API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon-32x32.png",
    )


@router.get("/docs/assets/{name}", include_in_schema=False)
async def swagger_asset(name: str):
    if name not in ASSETS:
        raise HTTPException(404, f"no asset {name!r}")
    return FileResponse(swagger_ui_path / name, headers={"Cache-Control": "public, max-age=86400"})
