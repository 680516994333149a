"""Benchmark: our blocked O(T^2) stick-breaking attention vs the official O(T^3) form vs SDPA.

Three implementations, measured in the same run on the same inputs:

- ``ours``: `modformer.nn.stick_breaking.stick_breaking_attention` (blocked over query
  rows, reverse cumsum along keys, hand-written recomputing backward).
- ``official``: the formulation of IBM/ModuleFormer's ``stickbreaking_att``, rewritten here
  in (B, H, T, D) layout: the T x T log-sigmoid is materialised and its reverse cumulative
  sum is a matmul with a strictly lower-triangular T x T matrix of ones (O(T^3)); plain
  autograd keeps every T x T intermediate for the backward.
- ``sdpa``: causal softmax attention, `F.scaled_dot_product_attention(is_causal=True)`.

Timing: median over ``--repeats`` interleaved runs after ``--warmup`` runs of each.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus the memory allocated before
the call. On CPU the PyTorch allocator keeps no statistics, so each implementation runs in
a fresh subprocess: it builds its inputs, resets the kernel's peak-RSS counter (writing
"5" to /proc/self/clear_refs resets VmHWM, Linux >= 4.0), runs one step and reports
``VmHWM - VmRSS_before``: the extra resident memory at the peak of that step, with
nothing left over from another implementation. The subprocess runs with glibc's
``MALLOC_MMAP_THRESHOLD_=65536``: every buffer over 64 KiB is its own mmap, returned to
the kernel when the tensor is freed, so RSS follows the live tensors (glibc's default
adaptive threshold keeps freed multi-MiB blocks resident for reuse, which adds
allocation-order noise of tens of MiB; ``--malloc-default`` measures that way instead).
Anything else the step allocates (MKL workspaces, autograd buffers) is counted too.

Times are wall-clock medians; the CPU-time median (``time.process_time``, all threads)
is printed next to it because on a shared machine wall time also counts waiting for a
core.

On a shared, oversubscribed CPU, libgomp's default spin-waiting makes every parallel
op wait for a descheduled worker; code with many medium-sized ops (ours: ~30 per block)
suffers far more than a few huge GEMMs (official). ``--threads 1`` or
``OMP_WAIT_POLICY=PASSIVE`` (set in the environment, before torch starts) avoid it.

Example::

    python bench/stick_breaking.py                       # B=2 H=8 T=1024 D=64 fp32 fwd+bwd
    python bench/stick_breaking.py --seq 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from modformer.nn.stick_breaking import stick_breaking_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def official_stick_breaking(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """IBM/ModuleFormer's formulation: T x T log-sigmoid times a triangular T x T matrix."""
    Tq, Tk, D = q.shape[2], k.shape[2], q.shape[3]
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)
    future = torch.tril(torch.ones(Tk, Tk, dtype=torch.int8, device=q.device))[Tk - Tq :] == 0
    beta = torch.sigmoid(logits).masked_fill(future, 0)
    log_one_minus_beta = F.logsigmoid(-logits).masked_fill(future, 0)
    # cum_weight[j, i] = 1 iff j > i: (log(1 - beta) @ cum_weight)[t, i] = sum_{j > i} ...
    cum_weight = torch.tril(torch.ones(Tk, Tk, device=q.device), -1).to(logits.dtype)
    reverse_cum_log = log_one_minus_beta @ cum_weight
    att = beta * reverse_cum_log.exp()
    return att @ v


def sdpa_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def make_ours(block_size: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return lambda q, k, v: stick_breaking_attention(q, k, v, block_size=block_size)


def make_inputs(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v, grad = (torch.randn(shape, generator=g) for _ in range(4))
    dtype = DTYPES[args.dtype]
    q, k, v = (t.to(device, dtype).requires_grad_(args.mode == "fwd+bwd") for t in (q, k, v))
    return q, k, v, grad.to(device, dtype)


def run_once(fn, q: Tensor, k: Tensor, v: Tensor, grad: Tensor, mode: str) -> None:
    if mode == "fwd":
        with torch.no_grad():
            fn(q, k, v)
        return
    for t in (q, k, v):
        t.grad = None
    fn(q, k, v).backward(grad)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(impls: dict[str, Callable], inputs, args, device) -> dict[str, tuple]:
    """Median (wall seconds, CPU seconds) of one step of each implementation.

    The repeats are interleaved (ours, official, sdpa, ours, ...) so that a change in
    the load of a shared machine hits every implementation alike.
    """
    for _ in range(args.warmup):
        for fn in impls.values():
            run_once(fn, *inputs, args.mode)
    sync(device)
    wall: dict[str, list[float]] = {name: [] for name in impls}
    cpu: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name, fn in impls.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            run_once(fn, *inputs, args.mode)
            sync(device)
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in impls}


def _read_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_memory_bytes_here(fn, inputs, args, device) -> int:
    """Extra memory at the peak of one step, measured in this process (see module doc)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run_once(fn, *inputs, args.mode)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _read_kib("VmRSS")
    run_once(fn, *inputs, args.mode)
    return (_read_kib("VmHWM") - before) * 1024


def implementations(args: argparse.Namespace) -> dict[str, Callable]:
    return {
        "ours": make_ours(args.block_size),
        "official": official_stick_breaking,
        "sdpa": sdpa_causal,
    }


def peak_memory_bytes(name: str, args: argparse.Namespace, device: torch.device) -> int:
    if device.type == "cuda":
        return peak_memory_bytes_here(
            implementations(args)[name], make_inputs(args, device), args, device
        )
    # CPU: a fresh interpreter per implementation (see the module docstring).
    cmd = [sys.executable, __file__, "--memory-probe", name, "--device", str(device)]
    for flag in ("batch", "heads", "seq", "head_dim", "dtype", "mode", "block_size", "threads"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    env = dict(os.environ)
    if not args.malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return int(result.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--mode", choices=["fwd+bwd", "fwd"], default="fwd+bwd")
    p.add_argument("--block-size", type=int, default=128, help="query rows per block (ours)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument(
        "--malloc-default",
        action="store_true",
        help="CPU memory probe with glibc's default malloc settings (see module doc)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one CPU memory run
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.memory_probe is not None:
        fn = implementations(args)[args.memory_probe]
        print(peak_memory_bytes_here(fn, make_inputs(args, device), args, device))
        return

    inputs = make_inputs(args, device)
    impls = implementations(args)
    with torch.no_grad():  # sanity check: the two stick-breaking forms agree
        max_diff = (impls["ours"](*inputs[:3]) - impls["official"](*inputs[:3])).abs().max()

    results: dict[str, dict[str, float]] = {}
    for name, (wall, cpu) in median_times(impls, inputs, args, device).items():
        results[name] = {"median_ms": 1e3 * wall, "median_cpu_ms": 1e3 * cpu}
        if not args.no_memory:
            results[name]["peak_mib"] = peak_memory_bytes(name, args, device) / 2**20

    ours, official, sdpa = results["ours"], results["official"], results["sdpa"]
    summary = {
        "speedup_ours_over_official": official["median_ms"] / ours["median_ms"],
        "speedup_ours_over_official_cpu_time": official["median_cpu_ms"] / ours["median_cpu_ms"],
        "time_ours_over_sdpa": ours["median_ms"] / sdpa["median_ms"],
        "time_ours_over_sdpa_cpu_time": ours["median_cpu_ms"] / sdpa["median_cpu_ms"],
        "max_abs_diff_ours_vs_official": float(max_diff),
    }
    if not args.no_memory:
        summary["memory_ours_over_official"] = ours["peak_mib"] / official["peak_mib"]
        summary["memory_ours_over_sdpa"] = ours["peak_mib"] / max(sdpa["peak_mib"], 1e-9)

    config = {k: v for k, v in vars(args).items() if k not in ("json", "memory_probe")}
    config["torch"] = torch.__version__
    config["threads"] = torch.get_num_threads()
    config["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    config["load_avg_1min_after"] = os.getloadavg()[0]
    config["cpu_count"] = os.cpu_count()
    print(
        f"stick-breaking attention, B={args.batch} H={args.heads} T={args.seq} "
        f"D={args.head_dim} {args.dtype} {args.mode} on {device} "
        f"({config['threads']} threads, torch {torch.__version__})"
    )
    print(f"{'impl':<10}{'median ms':>12}{'CPU ms':>12}{'peak MiB':>12}")
    for name, r in results.items():
        peak = f"{r['peak_mib']:12.1f}" if "peak_mib" in r else f"{'-':>12}"
        print(f"{name:<10}{r['median_ms']:12.2f}{r['median_cpu_ms']:12.2f}{peak}")
    for key, value in summary.items():
        print(f"{key}: {value:.3g}")
    busy = config["load_avg_1min_after"] > config["cpu_count"]
    if device.type == "cpu" and busy and config["threads"] > 1:
        print(
            f"note: busy machine (load {config['load_avg_1min_after']:.1f} on "
            f"{config['cpu_count']} cores). With several threads, OpenMP workers spin-wait "
            "for descheduled peers at every op, which penalises many-op code like ours; "
            "compare with --threads 1 or OMP_WAIT_POLICY=PASSIVE."
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": results, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
