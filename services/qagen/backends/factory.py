"""`make_generator`: the QA backend a session asks for, built from the server's Settings.

"" means the server's default (`DOCLORA_QAGEN_BACKEND`, else extractive). The model backends'
heavy imports (httpx, torch, transformers) happen only when one is asked for; the local model is
loaded once per process and kept.
"""

from __future__ import annotations

import functools

from services.common.config import Settings
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.options import QA_BACKENDS
from services.qagen.backends.extractive import ExtractiveGenerator


@functools.lru_cache(maxsize=1)
def _local_generator(settings: Settings):

    from services.common.model import load_base_model
    from services.qagen.backends.local import LocalGenerator

    model_settings = (
        settings.replace(base_model=settings.qagen_local_model) if settings.qagen_local_model else settings
    )
    model, tokenizer = load_base_model(model_settings)
    return LocalGenerator(model, tokenizer)


def make_generator(settings: Settings, backend: str):
    """The generator of `backend` ("" = the server's default); an OpenAI one must be closed."""
    backend = (backend or settings.qagen_backend or "extractive").strip().lower()
    if backend == "extractive":
        return ExtractiveGenerator()
    if backend == "openai":
        if not settings.qagen_openai_url:
            raise FailedPrecondition(
                "the openai QA backend needs an endpoint: set DOCLORA_QAGEN_OPENAI_URL (and _MODEL, _KEY)"
            )
        from services.qagen.backends.openai_api import OpenAIGenerator

        return OpenAIGenerator(
            settings.qagen_openai_url,
            settings.qagen_openai_key.get_secret_value(),
            settings.qagen_openai_model,
            concurrency=settings.qagen_concurrency,
            timeout=settings.qagen_timeout_s,
        )
    if backend == "local":
        try:
            return _local_generator(settings)
        except ImportError as exc:
            raise FailedPrecondition(f"the local QA backend needs torch and transformers: {exc}") from None
    raise InvalidArgument(f"unknown QA backend {backend!r}; use one of {', '.join(QA_BACKENDS)}")
