"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (request it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`). On a 2-core machine shared with other
    jobs every 2-thread op ends in an OpenMP barrier that waits a scheduler time slice for the
    other thread; single-threaded, a module's runtime is predictable. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
