"""The power-and-clock tooling (no GPU): ``tools/clock_load.py`` (the SM clock and power while
one kernel runs back to back) and ``bench_kernels --sustained`` (steady-state timing): what they
refuse before any work, and what they derive from their readings."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("28672x4096:512", "is not NxK:M:NAME"),
        ("28672x4000:512:cublas", "multiple of 64 and K of the group"),
        ("28672x4096:many:cublas", "invalid literal"),
        ("28672x4096:0:op", "M must be at least 1"),
    ],
)
def test_clock_load_reads_every_case_before_any_work(monkeypatch, case, says):
    """``clock_load`` refuses a malformed case in one line before it asks for a GPU or NVML
    (here on a machine without either: the message is the case's)."""
    import clock_load

    argv = ["clock_load.py", "--idle", "--case", "4096x4096:256:cublas", "--case", case]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=says) as err:
        clock_load.main()
    assert str(err.value).startswith("clock_load: ") and "\n" not in str(err.value)


def test_clock_load_refuses_a_window_it_cannot_time(monkeypatch):
    """``--seconds`` outside 0.1-600 is refused in one line before any case is built."""
    import clock_load

    for bad in ("0", "-1", "nan", "1e9"):
        argv = ["clock_load.py", "--idle", "--seconds", bad, "--case", "4096x4096:256:cublas"]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as err:
            clock_load.main()
        assert err.value.code == 2  # argparse's usage error, with the message on stderr


def test_clock_load_sampler_hands_a_failed_read_to_the_caller():
    """An NVML read that fails in the sampling thread ends the sampling and is raised when the
    timed half ends, instead of leaving medians over part of the window unnoticed."""
    import clock_load

    class Flaky:
        def __init__(self):
            self.reads = 0

        def sample(self):
            self.reads += 1
            if self.reads > 3:
                raise SystemExit("clock_load: clock failed (NVML error 15)")
            return 1980, 400.0, 0

    sampler = clock_load.Sampler(Flaky())
    with pytest.raises(SystemExit, match="NVML error 15"):
        with sampler:
            while sampler.thread.is_alive():
                sampler.thread.join(0.01)
    assert len(sampler.samples) == 3
    healthy = clock_load.Sampler(type("Fine", (), {"sample": lambda self: (1980, 400.0, 0)})())
    with healthy:
        while len(healthy.samples) < 2:
            healthy.thread.join(0.01)
    assert healthy.error is None and healthy.samples[0] == (1980, 400.0, 0)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--sustained", "nan"], "give 0.1 to 600 seconds"),
        (["--sustained", "0.01"], "give 0.1 to 600 seconds"),
        (
            ["--sustained", "1", "--candidates"],
            "--sustained times the op, cuBLAS and tinygemm only",
        ),
    ],
)
def test_bench_kernels_refuses_a_steady_state_run_it_cannot_make(monkeypatch, capsys, argv, says):
    """``--sustained`` takes 0.1-600 seconds, and not with ``--candidates`` / ``--sweep``
    (their configurations are timed as bursts: rows side by side with steady-state cuBLAS
    would mix the protocols); refused in one line before any GPU work."""
    import bench_kernels

    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", *argv])
    with pytest.raises(SystemExit):
        bench_kernels.main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bench_kernels.py: error: ") and says in err


def test_clock_load_counts_waves_and_k_steps_of_whole_256_row_tiles():
    """The per-k-step figures divide by the launch's waves and a tile's k-steps: 28672x4096 at
    M = 512 is 2 row tiles x 224 column blocks of 128 = 448 tiles, 4 waves of 132 SMs, 64 + 2
    salient k-steps; 4096^2 at M = 256 one wave of 32. Other configurations get none."""
    import clock_load

    assert clock_load.whole_256("wg:256x2x1", 28672, 4096, 512, 132) == (448, 4, 66)
    assert clock_load.whole_256("wg:256x2x1", 4096, 4096, 256, 132) == (32, 1, 66)
    assert clock_load.whole_256("wg:256x2x1", 5120, 13824, 300, 132) == (80, 1, 218)
    for other in ("wg:256x2x1s", "wg:256x2x1t2", "wg:256x2x2c2", "wg:128x2x1", "cublas", "op"):
        assert clock_load.whole_256(other, 28672, 4096, 512, 132) is None
