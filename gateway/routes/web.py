"""The web UI: `GET /` serves `gateway/static/index.html` (left out of the OpenAPI document)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent.parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html")
