"""Timing, bandwidth and memory measurement for the benchmark.

CUDA: one CUDA-event pair per call, the L2 cache flushed (a 256 MiB buffer zeroed) before each
call so no input is served from cache. CPU: ``time.perf_counter`` per call. Both report the
median of the repeats after warm-up; the number of repeats shrinks for slow calls so a row stays
within its time budget (at least 3 repeats).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch


class Timer:
    def __init__(self, device: torch.device, warmup: int = 2, repeats: int = 20,
                 budget_s: float = 3.0):
        self.device, self.warmup, self.repeats, self.budget_s = device, warmup, repeats, budget_s
        self._flush = (torch.empty(256 << 20, dtype=torch.uint8, device=device)
                       if device.type == "cuda" else None)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Callable[[int], object]) -> float:
        """Median milliseconds of ``fn(i)``, ``i`` counting calls (to rotate inputs)."""
        calls = 0
        self._sync()
        start = time.perf_counter()
        for _ in range(max(1, self.warmup)):
            fn(calls)
            calls += 1
        self._sync()
        per_call = (time.perf_counter() - start) / max(1, self.warmup)
        repeats = int(min(self.repeats, max(3, self.budget_s / max(per_call, 1e-9))))
        times = []
        if self.device.type == "cuda":
            for _ in range(repeats):
                self._flush.zero_()
                begin = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                begin.record()
                fn(calls)
                end.record()
                calls += 1
                end.synchronize()
                times.append(begin.elapsed_time(end))
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(calls)
                times.append((time.perf_counter() - t0) * 1e3)
                calls += 1
        return statistics.median(times)


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Device copy bandwidth in GB/s: (read + write bytes) / time of ``dst.copy_(src)``."""
    n = max(1, nbytes // 4)
    srcs = [torch.randn(n, device=timer.device) for _ in range(2)]
    dst = torch.empty_like(srcs[0])
    ms = timer.median_ms(lambda i: dst.copy_(srcs[i % 2]))
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def read_bandwidth(timer: Timer, nbytes: int) -> float:
    """Device read bandwidth in GB/s: bytes / time of ``x.sum()``."""
    n = max(1, nbytes // 4)
    srcs = [torch.randn(n, device=timer.device) for _ in range(2)]
    ms = timer.median_ms(lambda i: srcs[i % 2].sum())
    return n * 4 / (ms * 1e-3) / 1e9


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ side prints start/stop lines on fd 2; keep them off the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` beyond what was allocated before it (outputs
    and gradients included). CUDA: the caching allocator's peak. CPU: the allocation events of
    the torch profiler, replayed in order."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        from torch.profiler import ProfilerActivity, profile

        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
            fn()
    except Exception:  # the profiler is optional; the number is informative only
        return None
    # Each op's own (self) allocations count from its start, its net frees (often of its
    # children's temporaries) from its end; "[memory]" events are frees outside any op.
    events = []
    for e in prof.events():
        usage = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if usage:
            events.append((e.time_range.start if usage > 0 else e.time_range.end, usage))
    current = peak = 0
    for _, usage in sorted(events):
        current += usage
        peak = max(peak, current)
    return peak
