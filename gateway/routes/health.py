"""`GET /healthz`: the gateway process answers (it does not probe the services behind it)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}
