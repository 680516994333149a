"""Training step: torch.compile vs eager, and peak memory with vs without activation checkpointing.

``speed``: for each architecture (gpt, mom, moduleformer) and preset, two copies of the same
model (same weights, same batch), one eager and one compiled in place as ``modformer train
--compile true`` does (`nn.Module.compile`, inductor). A step is forward + backward + AdamW.
The compiled model's first step (compilation + one step) is timed on its own and reported
as the compile time, minus one median compiled step; then the steps of both are timed
interleaved (eager, compiled, eager, ...) and the table gives the paired ratio
compiled / eager (below 1: compile is faster).

``memory``: peak memory of one training step (forward + backward + AdamW) without and with
activation checkpointing (`activation_checkpointing_enable()`, what ``--activation_checkpointing
true`` does): the most bytes the step holds at once beyond what was allocated before it
(parameters and AdamW state, created by a short warm-up step, are not counted; activations,
gradients and temporaries are). CUDA: ``torch.cuda.max_memory_allocated`` minus
``memory_allocated`` before the step. CPU: PyTorch has no CPU allocator statistics, so the
live bytes of every tensor storage the step creates are tracked exactly with a dispatch mode
(`modformer.eval.costs.peak_tensor_bytes`, before allocator rounding; the peak resident set
would mostly show glibc's caching). Also reported: the bytes the forward saves for the
backward (`torch.autograd.graph.saved_tensors_hooks`), the part checkpointing removes.

    python bench/compile_step.py speed --presets tiny d512 --batch-size 8 --block-size 256
    python bench/compile_step.py memory --preset d512 --batch-size 1 --block-size 1024
    python bench/compile_step.py speed --presets tiny --steps 1 --block-size 32   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from common import interleaved_times, paired_ratio, sync
from modformer.eval.costs import peak_tensor_bytes
from modformer.models.registry import build_config, build_model

ARCHS = ("gpt", "mom", "moduleformer")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def make_model(arch: str, preset: str, block_size: int, device: torch.device):
    torch.manual_seed(0)
    config = build_config(
        arch, preset, vocab_size=4096, n_positions=max(block_size, 256), dropout=0.0
    )
    return build_model(config).to(device).train()


def make_step(model, optimizer, x: torch.Tensor, autocast_dtype: torch.dtype | None):
    """One training step on the batch x: forward, backward, AdamW."""

    def step() -> None:
        with torch.autocast(
            x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        ):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def bench_speed(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    autocast_dtype = AUTOCAST[args.dtype]
    for preset in args.presets:
        for arch in args.archs:
            eager = make_model(arch, preset, args.block_size, device)
            compiled = copy.deepcopy(eager)
            compiled.compile()
            x = torch.randint(0, 4096, (args.batch_size, args.block_size), device=device)
            steps = {
                "eager": make_step(eager, adamw(eager), x, autocast_dtype),
                "compiled": make_step(compiled, adamw(compiled), x, autocast_dtype),
            }
            sync(device)
            t0 = time.perf_counter()
            steps["compiled"]()  # compiles forward and backward, then runs the step
            sync(device)
            first_compiled = time.perf_counter() - t0
            times = interleaved_times(steps, device, warmup=args.warmup, repeats=args.steps)
            eager_s = statistics.median(times["eager"]["wall"])
            compiled_s = statistics.median(times["compiled"]["wall"])
            rows.append(
                {
                    "arch": arch,
                    "preset": preset,
                    "eager_ms": 1e3 * eager_s,
                    "compiled_ms": 1e3 * compiled_s,
                    "compiled_over_eager": paired_ratio(
                        times["compiled"]["wall"], times["eager"]["wall"]
                    ),
                    "compile_s": max(first_compiled - compiled_s, 0.0),
                }
            )
            torch._dynamo.reset()
    print(
        f"device {device}, threads {torch.get_num_threads()}, {args.dtype}, "
        f"batch {args.batch_size} x {args.block_size}"
    )
    print(
        f"{'arch':<14}{'preset':<8}{'eager ms':>10}{'compiled ms':>13}{'compiled/eager':>16}"
        f"{'compile s':>11}"
    )
    for r in rows:
        print(
            f"{r['arch']:<14}{r['preset']:<8}{r['eager_ms']:10.1f}{r['compiled_ms']:13.1f}"
            f"{r['compiled_over_eager']:16.3f}{r['compile_s']:11.1f}"
        )
    return rows


# ---- memory -------------------------------------------------------------------------


def _saved_bytes(model, x: torch.Tensor, autocast_dtype) -> int:
    """Bytes of the activations the forward saves for the backward (each storage once;
    parameters, which autograd saves too, are left out)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
    ):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def measure_memory(
    arch: str, args: argparse.Namespace, device: torch.device, checkpointing: bool
) -> dict:
    """Peak bytes allocated above what was allocated before, over forward + backward and
    over a whole step (AdamW included: its foreach update takes parameter-sized temporaries,
    which checkpointing does not touch)."""
    autocast_dtype = AUTOCAST[args.dtype]
    model = make_model(arch, args.preset, args.block_size, device)
    if checkpointing:
        model.activation_checkpointing_enable()
    x = torch.randint(0, 4096, (args.batch_size, args.block_size), device=device)
    optimizer = adamw(model)
    # A warm-up step on a short sequence creates the AdamW state before the measurement.
    make_step(model, optimizer, x[:, :8], autocast_dtype)()
    step = make_step(model, optimizer, x, autocast_dtype)

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()

    result = {}
    for name, fn in (("fwd_bwd", forward_backward), ("step", step)):
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            result[name] = torch.cuda.max_memory_allocated(device) - before
        else:
            result[name] = peak_tensor_bytes(fn, device)
    optimizer.zero_grad(set_to_none=True)
    result["saved"] = _saved_bytes(model, x, autocast_dtype)
    return result


def bench_memory(args: argparse.Namespace, device: torch.device) -> list[dict]:
    method = (
        "cuda max_memory_allocated - memory_allocated before the step"
        if device.type == "cuda"
        else "peak live tensor bytes (modformer.eval.costs.peak_tensor_bytes)"
    )
    rows = []
    for arch in args.archs:
        row = {"arch": arch, "preset": args.preset, "method": method}
        for checkpointing in (False, True):
            result = measure_memory(arch, args, device, checkpointing)
            key = "ckpt" if checkpointing else "plain"
            for name in ("fwd_bwd", "step", "saved"):
                row[f"{name}_{key}_mib"] = result[name] / 2**20
        for name in ("fwd_bwd", "step", "saved"):
            row[f"{name}_ratio"] = row[f"{name}_ckpt_mib"] / row[f"{name}_plain_mib"]
        rows.append(row)
    print(f"device {device}, {args.dtype}, batch {args.batch_size} x {args.block_size}")
    print(f"peak: {method}; saved: activations the forward saves for the backward")
    print("MiB: plain / checkpointed (ratio)")
    print(f"{'arch':<14}{'fwd+bwd peak':>26}{'step peak (AdamW incl.)':>28}{'saved':>24}")
    for r in rows:
        cells = [
            f"{r[f'{n}_plain_mib']:.1f} / {r[f'{n}_ckpt_mib']:.1f} ({r[f'{n}_ratio']:.3f})"
            for n in ("fwd_bwd", "step", "saved")
        ]
        print(f"{r['arch']:<14}{cells[0]:>26}{cells[1]:>28}{cells[2]:>24}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    speed = sub.add_parser("speed", help="compiled vs eager training step")
    speed.add_argument("--presets", nargs="+", default=["tiny", "d512"])
    speed.add_argument("--steps", type=int, default=5, help="timed steps of each model")
    speed.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    memory = sub.add_parser("memory", help="peak memory with vs without checkpointing")
    memory.add_argument("--preset", default="d512")
    for sp, batch, block in ((speed, 8, 256), (memory, 1, 1024)):
        sp.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
        sp.add_argument("--batch-size", type=int, default=batch)
        sp.add_argument("--block-size", type=int, default=block)
        sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sp.add_argument(
            "--dtype", choices=sorted(AUTOCAST), default="fp32", help="fp32, or bf16 autocast"
        )
        sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
        sp.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = bench_speed(args, device) if args.mode == "speed" else bench_memory(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
