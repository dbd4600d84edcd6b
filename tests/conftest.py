"""Shared pytest set-up: fixture modules are registered here so every test file can use them."""

import os

# Nothing in the test suite may reach a hub: fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.tiny_models",
    "tests.fixtures.prod_tokenizers",
]
