"""Adapters from the store: the adapter cache's `fetch`, which downloads a bot's PEFT folder once
into a local cache folder. A folder is moved into place only when complete (it has its
`adapter_config.json`), so a download cut short is never taken for an adapter."""

from __future__ import annotations

from pathlib import Path

from services.common import keys
from services.common.errors import NotFound
from services.common.runtime import Runtime


def adapter_fetcher(rt: Runtime, cache_dir: Path):
    """A `fetch(adapter_id) -> folder` for the adapter cache: download the PEFT folder once."""

    def fetch(adapter_id: str) -> Path:
        if not keys.is_valid_id(adapter_id):
            raise NotFound(f"adapter {adapter_id!r} not found")
        folder = cache_dir / adapter_id
        if not (folder / "adapter_config.json").exists():
            tmp = cache_dir / f".{adapter_id}.partial"
            rt.store.download_dir(keys.adapter_prefix(rt.settings.tenant, adapter_id), tmp)
            if not (tmp / "adapter_config.json").exists():
                raise NotFound(f"adapter {adapter_id!r} not found")
            tmp.replace(folder)
        return folder

    return fetch
