"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from langseg.predict import Referrer, Segmenter


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


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    """The bundled ``lseg-shapes`` Segmenter (offline, small), loaded once per test module."""
    import langseg

    return langseg.load("lseg-shapes")


@pytest.fixture(scope="module")
def referrer() -> Referrer:
    """The bundled ``vlt-shapes`` Referrer (offline, small), loaded once per test module."""
    import langseg

    return langseg.load("vlt-shapes")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print how many generated bad-input cases the robustness suite ran (issue 13 asks for >= 300)."""
    from tests.robust import CASES

    if CASES:
        areas = ", ".join(f"{area} {count}" for area, count in sorted(CASES.items()))
        terminalreporter.write_line(f"robustness suite: {sum(CASES.values())} generated cases ({areas})")
