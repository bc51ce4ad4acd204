"""Shared pytest setup: real-server fixtures live in tests/fixtures/ and are loaded as plugins."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.nats"]
