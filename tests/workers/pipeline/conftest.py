"""Fixtures of the pipeline's tests."""

import pytest
import ray


@pytest.fixture(scope="session")
def local_ray():
    """One small local Ray instance for the session (2 CPUs, no dashboard), shut down at the end."""
    if ray.is_initialized():  # another test module left one running: share it
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
