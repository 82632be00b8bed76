"""Shared test configuration: deterministic seeds, one intra-op thread for the tiny problems
(on a 2-core machine extra threads only add overhead to torch.func-heavy tests)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
