import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from surgeon_fx.testing.strategies import register_profiles  # noqa: E402

# Registered at import, before Hypothesis's plugin loads a --hypothesis-profile.
register_profiles()


def pytest_configure(config):
    """Load the Hypothesis profile "ci" unless --hypothesis-profile names another one."""
    from hypothesis import settings

    if not config.getoption("--hypothesis-profile", default=None):
        settings.load_profile("ci")


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a test module's torch ops on one thread, then restore the thread count.

    On a 2-core machine that other processes keep busy, a 384x1536 SVD took 8 s on
    torch's default 2 threads and 0.08 s on one (torch 2.13 CPU). Modules that run
    many SVDs opt in with ``pytestmark = pytest.mark.usefixtures("torch_single_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
