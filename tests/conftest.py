"""Shared pytest setup: real-server fixtures live in tests/fixtures/ and are loaded as plugins."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.nats"]


@pytest.fixture(autouse=True, scope="session")
def _cpu_bf16_as_forced():
    """`DOCLORA_TRAIN_PRECISION=fp32` or `=bf16` in the environment runs the suite as on a CPU
    without or with native bf16: "auto" precision (a bare LoraTrainConfig, Settings()) resolves
    that way in this process, and processes the tests start read the variable themselves. CI gets
    whichever kind of CPU is free, so both must pass: run `make test` once each way. (Session
    scope: module fixtures that train are made before any function fixture.)"""
    forced = os.environ.get("DOCLORA_TRAIN_PRECISION", "").strip().lower()
    with pytest.MonkeyPatch.context() as patch:
        if forced in ("fp32", "bf16"):
            from services.trainer import config

            patch.setattr(config, "cpu_has_native_bf16", lambda: forced == "bf16")
        yield


@pytest.fixture
def runtime(bus, store, s3_settings):
    """A service Runtime on this test's real nats-server and SeaweedFS bucket, with `s3_settings`;
    tests that need other settings take `dataclasses.replace(runtime, settings=...)`."""
    from services.common.runtime import Runtime
    from services.common.sessions import SessionRepo

    return Runtime(settings=s3_settings, bus=bus, store=store, sessions=SessionRepo(bus))
