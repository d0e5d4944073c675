"""Shared helpers of the robustness suite (``tests/test_robust_*.py``).

Every generated bad input must end in a correct result or a :class:`~langseg.errors.LangsegError` (on
the CLI: exit status 2, one message, no traceback), never another exception, a hang or a file changed
that the command did not own. :func:`expect_clean` / :func:`run_cli` check that and count each case per
area in :data:`CASES`; ``conftest.py`` prints the count at the end of the run.

Hypothesis runs derandomised (the same cases on every run, so CI is stable) with no deadline (a shared
2-core machine times out honest cases) and no example database (nothing written to the checkout).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings

from langseg.errors import LangsegError

CASES: Counter[str] = Counter()

# Use as ``@ROBUST`` (or ``@settings(parent=ROBUST, max_examples=N)``) on each generated test.
ROBUST = settings(
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def expect_clean(area: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``: its result, or the :class:`LangsegError` it raised (returned, so the
    test can check the message). Any other exception fails the test with the input in the message."""
    CASES[area] += 1
    try:
        return call(*args, **kwargs)
    except LangsegError as err:
        assert err.message and err.hint, f"{type(err).__name__} without message or hint: {err!r}"
        return err
    except Exception as err:  # the point: anything else is a bug
        raise AssertionError(
            f"{area}: {type(err).__name__} escaped for args={args!r} kwargs={kwargs!r}: {err}"
        ) from err


def run_cli(area: str, monkeypatch: Any, capsys: Any, *args: str) -> tuple[int, str, str]:
    """``langseg ARGS`` in-process through the real entry point: (exit code, stdout, stderr). Exit 2
    must come with exactly one ``error:`` line and no traceback; any escaping exception fails."""
    from langseg.cli import main

    CASES[area] += 1
    monkeypatch.setattr(sys, "argv", ["langseg", *args])
    monkeypatch.setenv("COLUMNS", "200")
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception as err:
        command = " ".join(args)
        raise AssertionError(f"{area}: {type(err).__name__} escaped `langseg {command}`: {err}") from err
    out, err_text = capsys.readouterr()
    assert "Traceback" not in out + err_text, f"traceback from `langseg {' '.join(args)}`:\n{err_text}"
    if code == 2 and "error:" in err_text:
        assert err_text.count("error:") == 1, err_text
    return code, out, err_text
