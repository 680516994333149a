"""Shared benchmark helpers: timing with warm-up, and the machine's matmul peak."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from modformer.utils import retain_freed_memory

# Every benchmark runs with the allocator setting the `modformer` CLI uses (freed CPU
# memory is reused, not page-faulted in again); MODFORMER_RETAIN_FREED_MEMORY=0 measures
# with glibc's defaults instead.
RETAINS_FREED_MEMORY = retain_freed_memory()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5
) -> float:
    """Median wall time of `fn()` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048
) -> float:
    """Achieved FLOP/s of a large square matmul: the practical peak we compare against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_time(lambda: a @ b, device, warmup=2, repeats=5)
    return 2 * n**3 / seconds


def interleaved_times(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of `repeats` runs of each fn, run in turn (A B C A B C ...)
    so that a change of load on a shared machine hits every fn alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            cpu_start = time.process_time()
            times[name]["wall"].append(median_time(fn, device, warmup=0, repeats=1))
            times[name]["cpu"].append(time.process_time() - cpu_start)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a / b within the same round."""
    return statistics.median(x / y for x, y in zip(a, b))
