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
    import nvml_power

    class Flaky:
        def __init__(self):
            self.reads = 0

        def sample(self):
            self.reads += 1
            if self.reads > 3:
                raise SystemExit("NVML: clock failed (error 15)")
            return 1980, 400.0, 0

    sampler = nvml_power.Sampler(Flaky())
    with pytest.raises(SystemExit, match="error 15"):
        with sampler:
            while sampler.thread.is_alive():
                sampler.thread.join(0.01)
    assert len(sampler.samples) == 3
    healthy = nvml_power.Sampler(type("Fine", (), {"sample": lambda self: (1980, 400.0, 0)})())
    with healthy:
        while len(healthy.samples) < 2:
            healthy.thread.join(0.01)
    assert healthy.error is None and healthy.samples[0] == (1980, 400.0, 0)


def test_a_window_of_nvml_samples_reads_as_medians_and_the_reasons_seen():
    """``nvml_power.summary``: the clock's median, lowest and highest, the power's median and
    every clock-event reason any sample carried (0x4 power cap, 0x1 idle), in NVML's order."""
    import nvml_power

    got = nvml_power.summary([(1980, 500.0, 0x0), (1650, 690.0, 0x4), (1500, 695.0, 0x5)])
    assert got == dict(
        mhz_median=1650, mhz_min=1500, mhz_max=1980, watts=690.0, reasons="idle,sw-power-cap",
        samples=3,
    )  # fmt: skip
    assert nvml_power.summary([(1980, 300.0, 0)])["reasons"] == "none"
    with pytest.raises(ValueError, match="no NVML sample"):
        nvml_power.summary([])


def test_a_steady_state_bench_row_carries_the_boards_readings(monkeypatch):
    """``bench_kernels --sustained`` reads NVML over each timing's timed half where it loaded
    (``POWER``): the time is the timer's, the readings the sampler's; a burst, or a machine
    without NVML, gives the time alone. (The timer is stood in for: no GPU here.)"""
    import bench_kernels

    class Board:
        def sample(self):
            return 1700, 688.0, 0x4

    def timer(calls, seconds, timed_half=None):
        assert seconds == 0.8
        if timed_half is not None:
            with timed_half:
                while len(timed_half.samples) < 3:
                    timed_half.thread.join(0.005)
        return 12.5

    monkeypatch.setattr(bench_kernels, "sustained_time_us", timer)
    monkeypatch.setattr(bench_kernels, "graph_time_us", lambda calls: 9.0)
    monkeypatch.setattr(bench_kernels, "SUSTAINED", 0.8)
    monkeypatch.setattr(bench_kernels, "POWER", Board())
    us, power = bench_kernels.time_with_power([])
    assert us == 12.5 and power["watts"] == 688.0 and power["reasons"] == "sw-power-cap"
    assert power["mhz_median"] == 1700 and power["samples"] >= 3
    monkeypatch.setattr(bench_kernels, "POWER", None)
    assert bench_kernels.time_with_power([]) == (12.5, None)
    monkeypatch.setattr(bench_kernels, "SUSTAINED", 0.0)
    assert bench_kernels.time_with_power([]) == (9.0, None) and bench_kernels.time_calls([]) == 9.0


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


def _clock_row(name: str, us: float, watts: float, mhz: float, **extra) -> dict:
    return dict(
        gpu="NVIDIA H200", commit="0123456789ab", switches={}, N=4096, K=4096, M=512, bits=4,
        name=name, us=us, watts=watts, mhz_median=mhz, reasons="sw-power-cap", **extra,
    )  # fmt: skip


def test_clock_load_compare_sets_two_runs_side_by_side(tmp_path, monkeypatch, capsys):
    """``--compare BASE NEW`` (no GPU, no --idle needed) prints each case both runs hold, BASE ->
    NEW, with the time ratio and the energy a launch (time x power): 44.0 us at 500 W is 22.0 mJ,
    40.0 us at 400 W 16.0 mJ, 0.727x; a case only one run holds is left out, and a diagnosis
    build's switch is named in the header."""
    import json

    import clock_load

    base = [
        _clock_row("wg:256x2x1", 44.0, 500.0, 1800, clk_kstep=1300.0),
        _clock_row("cublas", 30.0, 690.0, 1400),
    ]
    new = [_clock_row("wg:256x2x1", 40.0, 400.0, 1980, clk_kstep=1310.0)]
    new[0].update(switches={"GIFT_QUANT_CUDA_DEFINES": "GQ_NO_DEQUANT"}, reasons="none")
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps(new))
    argv = ["clock_load.py", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    monkeypatch.setattr(sys, "argv", argv)
    clock_load.main()
    out = capsys.readouterr().out.splitlines()
    assert "GQ_NO_DEQUANT" in out[0] and "GQ_NO_DEQUANT" not in out[0].split("-> NEW")[0]
    (line,) = [x for x in out if x.startswith("4096x4096 M=512 W4 wg:256x2x1")]
    assert line.split()[4:] == [
        "44.0", "->", "40.0", "0.909", "1800", "->", "1980", "500", "->", "400",
        "1300", "->", "1310", "22.0", "->", "16.0", "0.727", "sw-power-cap", "->", "none",
    ]  # fmt: skip
    assert out[-1] == "only in BASE: 4096x4096 M=512 W4 cublas"  # no row: one run has it


def test_clock_load_compare_reads_gzipped_runs_and_rows_without_cycles(tmp_path, capsys):
    """A superseded run kept gzipped reads as the plain file does; a case without cycles per
    k-step (cuBLAS, the routed op) shows "-" there."""
    import gzip
    import json

    import clock_load

    rows = [_clock_row("cublas", 30.0, 690.0, 1400)]
    plain, packed = tmp_path / "a.json", tmp_path / "a.json.gz"
    plain.write_text(json.dumps(rows))
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    (line,) = [x for x in clock_load.compare(str(packed), str(plain)) if x.startswith("4096x")]
    assert line.split()[4:12] == ["30.0", "->", "30.0", "1.000", "1400", "->", "1400", "690"]
    assert line.split()[14] == "-"


def test_clock_load_compare_refuses_runs_it_cannot_set_side_by_side(tmp_path):
    """Two runs with no case in common, a file that is not JSON, one that is not a list of rows
    and rows without a reading are each refused in one line naming the file."""
    import json

    import clock_load

    a, b, bad, other = (tmp_path / f for f in ("a.json", "b.json", "bad.json", "other.json"))
    a.write_text(json.dumps([_clock_row("wg:256x2x1", 44.0, 500.0, 1800)]))
    b.write_text(json.dumps([_clock_row("cublas", 30.0, 690.0, 1400)]))
    bad.write_text("{not json")
    other.write_text(json.dumps({"rows": []}))
    twice, zero = tmp_path / "twice.json", tmp_path / "zero.json"
    twice.write_text(json.dumps([_clock_row("cublas", 30.0, 690.0, 1400)] * 2))
    zero.write_text(json.dumps([_clock_row("cublas", 0.0, 690.0, 1400)]))
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"N": 4096, "K": 4096, "M": 512, "bits": 4, "name": "op"}]))
    for args, says in [
        ((a, short), "rows without mhz_median, reasons, us, watts"),
        ((a, b), "share no case"),
        ((a, bad), "bad.json: cannot read it as JSON"),
        ((other, a), "expected a non-empty list of rows as clock_load writes"),
        ((a, tmp_path / "missing.json"), "missing.json: cannot read it as JSON"),
        ((twice, a), r"case \(4096, 4096, 512, 4, 'cublas'\) read more than once"),
        ((zero, a), "a row's us or watts is not positive"),
    ]:
        with pytest.raises(SystemExit, match=says) as err:
            clock_load.compare(*map(str, args))
        assert str(err.value).startswith("clock_load: --compare") and "\n" not in str(err.value)


def test_clock_load_compare_refuses_the_options_of_a_run(monkeypatch, capsys):
    """``--compare`` reads two saved runs: a case, bit width, window or file name beside it
    (which it would ignore) is refused in one usage line naming them."""
    import clock_load

    for extra, says in [
        (["--case", "4096x4096:256:op"], "without --case"),
        (["--bits", "2", "--seconds", "3"], "without --bits, --seconds"),
    ]:
        monkeypatch.setattr(sys, "argv", ["clock_load.py", "--compare", "a.json", "b.json", *extra])
        with pytest.raises(SystemExit) as err:
            clock_load.main()
        assert err.value.code == 2 and says in capsys.readouterr().err
