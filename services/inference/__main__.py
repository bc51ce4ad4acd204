"""`python -m services.inference`: InferenceService over one base model per process
(DOCLORA_INFERENCE_BACKEND=local), or in front of a vLLM server that holds the model
(DOCLORA_INFERENCE_BACKEND=vllm, services/inference/vllm.py: no model is loaded here)."""

from services.common.entry import run_service


def local_engine(rt, fetch):
    """The in-process engine: the base model loaded here, adapters in an AdapterCache."""
    from services.common.model import load_base_model, pick_device
    from services.inference.engine import AdapterCache, ChatEngine

    model, tokenizer = load_base_model(rt.settings)
    device, _ = pick_device(rt.settings)
    # DOCLORA_ADAPTER_CACHE_MB bounds the bytes of loaded adapters' tensors (0: count only)
    cache_mb = rt.settings.adapter_cache_mb
    adapters = AdapterCache(fetch, capacity=rt.settings.adapter_cache_size, max_bytes=cache_mb * 2**20)
    return ChatEngine(
        model,
        tokenizer,
        adapters,
        device,
        max_batch=rt.settings.inference_max_batch,
        max_queue=rt.settings.inference_max_queue,
        int8=rt.settings.inference_int8,
        pack=rt.settings.inference_pack,
    )


async def setup(rt):
    import asyncio
    from pathlib import Path

    from doclora.v1 import inference_pb2, inference_pb2_grpc
    from services.inference.adapter_store import adapter_fetcher
    from services.inference.forget import forgetter
    from services.inference.service import InferenceServicer
    from services.inference.vllm import VllmEngine, backend_of

    backend = backend_of(rt.settings)  # a bad DOCLORA_INFERENCE_BACKEND or vLLM setting stops here
    cache_dir = Path(rt.settings.state_dir).resolve() / "adapter-cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    fetch = adapter_fetcher(rt, cache_dir)
    if backend == "vllm":
        engine = VllmEngine(rt.settings, fetch)
    else:
        engine = await asyncio.to_thread(local_engine, rt, fetch)

    servicer = InferenceServicer(rt, engine)

    def register(server):
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        return [inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name]

    # deleted sessions' adapters and passage indexes leave memory (vLLM, for that back end) and
    # the cache folder on every replica
    return register, [forgetter(rt, engine.adapters, cache_dir, servicer.bots.indexes)]


if __name__ == "__main__":
    run_service("inference", lambda s: s.inference_addr, setup)
