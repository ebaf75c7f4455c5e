"""Test configuration: a bounded, derandomised hypothesis profile by default (CI and local runs alike), and
the ``one_thread`` fixture."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# random examples on request (HYPOTHESIS_PROFILE=explore); by default every run draws the same examples, so
# a failure found while exploring becomes a fix, not a flaky CI
settings.register_profile("explore", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small tensors: on a busy 2-core machine the default two threads
    were 10–100× slower on tiny networks (a 4×4 float64 conv: 33 ms with two threads, 35 µs with one) and
    2–3× slower on VGG at 32×32. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
