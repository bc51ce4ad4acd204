"""Adapters from the store: the adapter cache's `fetch`, which downloads a bot's PEFT folder once
into a local cache folder. The engine and its cache know an adapter by `adapter_ref`
("{tenant}/{adapter_id}"), so two tenants' adapters never share an entry. A folder is moved into place only when complete (it has its
`adapter_config.json`), so a download cut short is never taken for an adapter."""

from __future__ import annotations

from pathlib import Path

from services.common import access, keys
from services.common.errors import NotFound
from services.common.runtime import Runtime


def adapter_ref(tenant: str, adapter_id: str) -> str:
    """How the engine and its adapter cache name a tenant's adapter."""
    return f"{tenant}/{adapter_id}"


def adapter_fetcher(rt: Runtime, cache_dir: Path):
    """A `fetch(adapter_ref) -> folder` for the adapter cache: download the PEFT folder once."""

    def fetch(ref: str) -> Path:
        tenant, _, adapter_id = ref.rpartition("/")
        if not access.is_tenant_name(tenant) or not keys.is_valid_id(adapter_id):
            raise NotFound(f"adapter {ref!r} not found")
        folder = cache_dir / tenant / adapter_id
        if not (folder / "adapter_config.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = folder.parent / f".{adapter_id}.partial"
            rt.store.download_dir(keys.adapter_prefix(tenant, adapter_id), tmp)
            if not (tmp / "adapter_config.json").exists():
                raise NotFound(f"adapter {adapter_id!r} not found")
            tmp.replace(folder)
        return folder

    return fetch
