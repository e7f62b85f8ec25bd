"""``tools/trace_mma.py`` without a GPU: what it refuses before any work, and how it reads a
launch's per-block timelines (hand-made blocks, hand-computed phases)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))


@pytest.fixture
def trace_mma(monkeypatch):
    # the tool asks for the diagnosis build at import; the variable is restored after the test
    monkeypatch.setenv("GIFT_QUANT_CUDA_DEFINES", "")
    import trace_mma

    return trace_mma


def block(start: int, sm: int, last: int, **at: int) -> list[int]:
    """32 slots: the start, the SM, whether it summed the splits, and phases (ns after start)."""
    row = [0] * 32
    row[0], row[29], row[28] = start, sm, last
    for slot, dt in at.items():
        row[int(slot[1:])] = start + dt
    return row


def test_summary_reads_phases_from_each_block_and_from_the_launch(trace_mma):
    """Per phase the median from each block's start, the median and latest from the launch's
    first start, over the blocks that recorded it."""
    blocks = [
        block(1000, 0, 0, s2=500, s4=2000, s5=3000, s7=3500, s27=4000, s30=4100),
        block(1200, 1, 0, s2=700, s4=2400, s5=3200, s7=3600, s27=4400, s30=4500),
        block(1100, 0, 1, s2=600, s4=2200, s5=3100, s7=3550, s27=4200, s30=6100),
    ]
    s = trace_mma.summary(blocks)
    assert s["blocks"] == 3 and s["sms"] == 2 and s["summing_blocks"] == 1
    assert s["span_us"] == pytest.approx(6.2)  # the last exit, 1100 + 6100, after the start 1000
    assert s["start_spread_us"] == pytest.approx(0.2)
    staged = s["phases"]["x staged"]
    # from each block's start: 0.5, 0.7, 0.6 us; from the launch's start: 0.5, 0.9, 0.7 us
    assert staged == {"blocks": 3, "from_block_us": 0.6, "from_launch_us": 0.7, "latest_us": 0.9}
    assert s["phases"]["exit"]["latest_us"] == pytest.approx(6.2)
    assert s["phases"]["split-K count back"]["from_block_us"] == pytest.approx(4.2)
    assert "shares summed" not in s["phases"]  # no block recorded it


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--names", "wg:64x2x3c3"], "not tensor-core configurations"),
        (["--names", "mma:2x4k4", "--m", "65"], "serves 1-64 rows"),
        (["--names", "mma:2x4k4", "--shape", "4096by4096"], "--shape"),
        (["--names", "mma:2x"], "is not mma:WNxS[kKW][cC]"),
        (["--names", "mma:2x4k4", "--m", "32"], "at 16 rows or fewer"),
    ],
)
def test_refuses_bad_arguments_before_any_work(trace_mma, monkeypatch, capsys, args, says):
    """A wrong kernel, row count or shape: a one-line usage error before it asks for a GPU."""
    monkeypatch.setattr(sys, "argv", ["trace_mma.py", "--idle", *args])
    with pytest.raises(SystemExit) as err:
        trace_mma.main()
    assert err.value.code == 2
    msg = capsys.readouterr().err.strip().splitlines()[-1]
    assert says in msg, msg
