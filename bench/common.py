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


def ratio_results(
    times: dict[str, dict[str, list[float]]],
    step_flops: dict[str, float],
    device: torch.device,
    reference: str = "dense",
) -> dict[str, dict[str, float]]:
    """Per fn: median and min ms, GFLOP/s (`step_flops`: FLOPs of one timed call) and the
    paired wall (and, on CPU, CPU-time) ratio to `reference`."""
    kinds = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    results = {}
    for name, t in times.items():
        wall = statistics.median(t["wall"])
        results[name] = {
            "median_ms": 1e3 * wall,
            "min_ms": 1e3 * min(t["wall"]),
            "gflop_per_s": step_flops[name] / wall / 1e9,
        }
        for kind in kinds:
            results[name][f"{kind}_ratio_vs_{reference}"] = paired_ratio(
                t[kind], times[reference][kind]
            )
        if device.type == "cpu":
            results[name]["median_cpu_ms"] = 1e3 * statistics.median(t["cpu"])
    return results


def print_ratio_table(
    results: dict[str, dict[str, float]], device: torch.device, label: str, width: int
) -> None:
    """The table of `ratio_results` (reference "dense"), one row per fn."""
    header = f"{label:<{width}}{'median ms':>11}{'min ms':>10}{'GFLOP/s':>9}{'/ dense':>9}"
    if device.type == "cpu":
        header += f"{'CPU ms':>10}{'CPU / dense':>13}"
    print(header)
    for name, r in results.items():
        line = (
            f"{name:<{width}}{r['median_ms']:11.1f}{r['min_ms']:10.1f}{r['gflop_per_s']:9.1f}"
            f"{r['wall_ratio_vs_dense']:9.3f}"
        )
        if device.type == "cpu":
            line += f"{r['median_cpu_ms']:10.1f}{r['cpu_ratio_vs_dense']:13.3f}"
        print(line)
