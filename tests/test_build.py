"""Building a kernel library once per machine (``kernels.build``): side-by-side compilations
stop together and fail in one line."""

from __future__ import annotations

import sys
import time

import pytest

from gift_quant.kernels import build

PY = sys.executable


def test_a_failing_compilation_stops_the_others_and_reports_its_last_line() -> None:
    t0 = time.monotonic()
    slow = [PY, "-c", "import time; time.sleep(30)"]
    bad = [PY, "-c", "import sys; print('warning', file=sys.stderr); sys.exit('error: bad input')"]
    with pytest.raises(RuntimeError, match="^error: bad input$"):
        build._run_side_by_side([slow, bad], time.monotonic() + 60)
    assert time.monotonic() - t0 < 20  # not the slow one's 30 s


def test_a_compilation_past_the_deadline_is_stopped() -> None:
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="past the time allowed"):
        build._run_side_by_side([[PY, "-c", "import time; time.sleep(30)"]], time.monotonic() + 1)
    assert time.monotonic() - t0 < 20


def test_side_by_side_compilations_that_pass_leave_no_error() -> None:
    ok = [PY, "-c", "import sys; print('note', file=sys.stderr)"]
    build._run_side_by_side([ok, ok], time.monotonic() + 60)
