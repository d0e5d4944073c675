"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test with one torch thread.

    Tiny models gain nothing from intra-op threads, and on a shared CPU their spin-waiting made these
    tests an order of magnitude slower; one thread keeps them fast and their timing stable. Use it per
    module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
