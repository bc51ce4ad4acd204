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
