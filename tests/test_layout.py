"""The house rules of the code layout (../shared/ARCHITECTURE.md): services meet only through the
contracts, the bus, the store and `services/common/`. No service imports another service's modules
or the local launcher (`services/stack`), common imports no service, and the gateway reaches the
services only through gRPC."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("ingest", "qagen", "trainer", "inference")
LAUNCHER = "stack"


def imported_modules(source: str) -> set[str]:
    """Every module a source file imports, at any depth (function-level imports count too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def allowed_parts(part: str) -> set[str]:
    """The `services.<x>` packages code in `part` (a service, common or the gateway) may import."""
    return {"common"} | ({part} if part in SERVICES else set())


def forbidden_imports(part: str, source: str) -> list[str]:
    """The packages (`services.<x>`) that imports in `source`, a file of `part`, cross into."""
    bad = set()
    for module in imported_modules(source):
        pieces = module.split(".")
        if pieces[0] == "services" and len(pieces) > 1 and pieces[1] in (*SERVICES, LAUNCHER):
            if pieces[1] not in allowed_parts(part):
                bad.add(f"services.{pieces[1]}")
    return sorted(bad)


def _files() -> list[tuple[str, Path]]:
    files = [(part, f) for part in (*SERVICES, "common") for f in (ROOT / "services" / part).rglob("*.py")]
    return files + [("gateway", f) for f in (ROOT / "gateway").rglob("*.py")]


def test_services_meet_only_in_common_and_the_gateway_imports_no_service():
    """No module of a service imports another service or the launcher; common and the gateway
    import neither."""
    files = _files()
    assert len(files) > 40  # the walk found the tree
    crossings = {
        str(f.relative_to(ROOT)): bad
        for part, f in files
        if (bad := forbidden_imports(part, f.read_text(encoding="utf-8")))
    }
    assert crossings == {}


def test_the_rule_catches_an_import_added_back_at_any_depth():
    """The check sees top-level, from- and function-level imports across services, and lets a
    service import itself and common."""
    assert forbidden_imports("trainer", "from services.qagen.worker import load_pairs\n") == ["services.qagen"]
    nested = "def f():\n    import services.inference.retrieve as r\n    return r\n"
    assert forbidden_imports("trainer", nested) == ["services.inference"]
    assert forbidden_imports("gateway", "from services import stack\n") == ["services.stack"]
    assert forbidden_imports("common", "from services.qagen import quality\n") == ["services.qagen"]
    own = "from services.trainer import loop\nfrom services.common.passages import BM25\n"
    assert forbidden_imports("trainer", own) == []
