"""The gateway's layout: every route is defined in a `gateway.routes` module and reaches the app only
through that module's `router`, which `create_app` includes exactly once; `gateway/app.py` assembles
the app and defines no route. Building the app starts nothing (the gRPC channels open in its
lifespan), so these tests need no stack."""

from __future__ import annotations

import importlib
import pkgutil

from fastapi import APIRouter
from fastapi.routing import iter_route_contexts

import gateway.routes
from gateway.app import create_app
from services.common.config import Settings

FASTAPI_OWN = {"openapi", "swagger_ui_html", "swagger_ui_redirect", "redoc_html"}


def _app_routes() -> list:
    app = create_app(Settings())
    return [r for r in iter_route_contexts(app.routes) if r.name not in FASTAPI_OWN]


def _router_modules() -> dict[str, APIRouter]:
    names = [m.name for m in pkgutil.iter_modules(gateway.routes.__path__)]
    return {name: importlib.import_module(f"gateway.routes.{name}").router for name in names}


def test_every_route_of_the_app_is_defined_in_a_router_module():
    """No route is defined in app.py (or anywhere outside gateway.routes)."""
    outside = {r.name: r.endpoint.__module__ for r in _app_routes()}
    outside = {name: module for name, module in outside.items() if not module.startswith("gateway.routes.")}
    assert outside == {}


def test_every_router_module_is_included_once_and_no_route_is_served_twice():
    """A router left out of create_app, or included twice, shows as a missing or repeated route."""
    served = [(r.path, tuple(sorted(r.methods))) for r in _app_routes()]
    assert len(served) == len(set(served)), served
    defined = [
        (route.path, tuple(sorted(route.methods)))
        for router in _router_modules().values()
        for route in router.routes
    ]
    assert sorted(defined) == sorted(served)


def test_docs_serve_swagger_ui_from_local_files():
    """/docs names no external URL, and the script, style sheet and icon it loads answer from the
    gateway (swagger-ui-bundle's files); the OpenAPI document it reads is there too."""
    import re

    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings()), base_url="http://localhost") as client:  # a loopback Host
        page = client.get("/docs")
        assert page.status_code == 200 and "SwaggerUIBundle" in page.text
        assert not re.search(r"https?://", page.text), page.text
        assets = re.findall(r"""(?:src|href)=["'](/docs/assets/[^"']+)""", page.text)
        assert len(assets) == 3, page.text
        for url in assets:
            resp = client.get(url)
            assert resp.status_code == 200 and len(resp.content) > 100, url
        assert client.get("/docs/assets/index.html").status_code == 404
        assert client.get("/openapi.json").json()["info"]["title"] == "doclora"


def test_the_gateway_server_uses_uvloop_and_httptools():
    """`python -m gateway` serves on uvicorn's "auto" loop and HTTP parser, which are uvloop and
    httptools when `uvicorn[standard]` is installed."""
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from gateway.__main__ import server_config

    config = server_config(Settings(), create_app(Settings()))
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
