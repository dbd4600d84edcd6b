"""Shared pytest set-up: fixture modules are registered here so every test file can use them."""

import os

# Nothing in the test suite may reach a hub: fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# Tests use tiny tensors: one intra-op thread is as fast, and it does not thrash when pytest shares
# the machine's two cores with server processes (the S3 server, Ray, uvicorn) or a second job.
torch.set_num_threads(1)

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.tiny_models",
    "tests.fixtures.prod_tokenizers",
    "tests.fixtures.planted",
    "tests.fixtures.ray",
]
