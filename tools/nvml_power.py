"""The board's SM clock, power and clock-event reasons through NVML (ctypes; libnvidia-ml ships
with the driver), sampled from a thread while a timed window runs: ``clock_load`` and
``bench_kernels --sustained`` read them beside their times."""

from __future__ import annotations

import ctypes
import functools
import operator
import statistics
import threading
import time

# NVML clock-event reasons (nvml.h, nvmlClocksEventReason*)
REASONS = {
    0x1: "idle",
    0x2: "app-clocks",
    0x4: "sw-power-cap",
    0x8: "hw-slowdown",
    0x20: "sw-thermal",
    0x40: "hw-thermal",
    0x80: "hw-power-brake",
    0x100: "display-clocks",
}


class Nvml:
    """The few NVML calls this needs, through ctypes (libnvidia-ml ships with the driver)."""

    def __init__(self, uuid: str) -> None:
        try:
            self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError as exc:
            raise SystemExit(f"NVML (libnvidia-ml.so.1) not found: {exc}") from None
        self._ok(self.lib.nvmlInit_v2(), "nvmlInit_v2")
        self.dev = ctypes.c_void_p()
        self._ok(
            self.lib.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(self.dev)),
            f"nvmlDeviceGetHandleByUUID({uuid})",
        )

    @staticmethod
    def _ok(rc: int, what: str) -> None:
        if rc != 0:
            raise SystemExit(f"NVML: {what} failed (error {rc})")

    def power_limit_w(self) -> float:
        """The board's enforced power limit, W."""
        mw = ctypes.c_uint()
        self._ok(self.lib.nvmlDeviceGetEnforcedPowerLimit(self.dev, ctypes.byref(mw)), "limit")
        return mw.value / 1e3

    def sample(self) -> tuple[int, float, int]:
        """(SM clock MHz, power W, clock-event reasons bit mask)."""
        clk, mw, why = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_ulonglong()
        self._ok(self.lib.nvmlDeviceGetClockInfo(self.dev, 1, ctypes.byref(clk)), "clock")
        self._ok(self.lib.nvmlDeviceGetPowerUsage(self.dev, ctypes.byref(mw)), "power")
        self._ok(
            self.lib.nvmlDeviceGetCurrentClocksThrottleReasons(self.dev, ctypes.byref(why)),
            "clock-event reasons",
        )
        return clk.value, mw.value / 1e3, why.value


class Sampler:
    """A context manager: NVML sampled every 5 ms from a thread while it is entered; a failed
    read ends the sampling and is raised on exit (a thread's exception would go unseen)."""

    def __init__(self, nvml: Nvml) -> None:
        self.nvml, self.samples, self.stop = nvml, [], threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.error: BaseException | None = None

    def _poll(self) -> None:
        try:
            while not self.stop.is_set():
                self.samples.append(self.nvml.sample())
                time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread in __exit__
            self.error = exc

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


def summary(samples: list[tuple[int, float, int]]) -> dict:
    """A window's samples as {mhz_median, mhz_min, mhz_max, watts (median), reasons (the
    clock-event reasons seen, comma-separated, or "none"), samples}; ValueError when empty."""
    if not samples:
        raise ValueError("no NVML sample in the window")
    mhz = [s[0] for s in samples]
    why = functools.reduce(operator.or_, (s[2] for s in samples))
    return dict(
        mhz_median=statistics.median(mhz),
        mhz_min=min(mhz),
        mhz_max=max(mhz),
        watts=statistics.median(s[1] for s in samples),
        reasons=",".join(v for k, v in REASONS.items() if why & k) or "none",
        samples=len(samples),
    )
