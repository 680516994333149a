"""Benchmark: FSDP2 against DDP, per rank: parameter + gradient + optimizer memory, and the
time of a training step (forward + backward + AdamW), in one run.

Launch under torchrun; every rank builds the same model (same seed) twice, wraps one copy
in DistributedDataParallel and shards the other with `fully_shard` (as `modformer train
--parallel ddp|fsdp` does, `modformer.train.distributed.shard_model`), and steps them in
turn (DDP, FSDP, DDP, ...) on the same batch, so a change of load hits both alike.

Memory is counted from the tensors each rank actually holds after a step: the local
shards (`DTensor.to_local()`) of the parameters, their gradients and AdamW's exp_avg /
exp_avg_sq / step. It does not depend on load. FSDP also allocates the gathered
parameters of one block at a time during forward and backward (and of the root, the
embedding and LM head, for the whole step); those are transient and not in this count.

    OMP_WAIT_POLICY=PASSIVE torchrun --nproc_per_node 2 bench/distributed_step.py \\
        --archs mom moduleformer --preset d512 --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from modformer.models.registry import build_config, build_model
from modformer.train.config import TrainConfig
from modformer.train.distributed import shard_model
from modformer.train.optim import make_optimizer


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def memory_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "params": nbytes(params),
        "grads": nbytes(p.grad for p in params if p.grad is not None),
        "optimizer": nbytes(states),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["mom", "moduleformer"])
    parser.add_argument("--preset", default="d512", help="size preset of every architecture")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each (0: memory only)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", help="also write the results to this JSON file (rank 0)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig()
    results = {}
    for arch in args.archs:
        torch.manual_seed(0)
        config = build_config(arch, args.preset, vocab_size=50304)
        ddp_model = build_model(config)
        fsdp_model = build_model(config)
        fsdp_model.load_state_dict(ddp_model.state_dict())
        find_unused = arch != "gpt"
        ddp = DDP(ddp_model, find_unused_parameters=find_unused)
        shard_model(fsdp_model, "fp32")
        runs = {
            "ddp": (ddp, make_optimizer(ddp_model, cfg)),
            "fsdp": (fsdp_model, make_optimizer(fsdp_model, cfg)),
        }
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size), generator=g)

        def step(model, optimizer, x: torch.Tensor = x) -> None:
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep the grads to count them

        times: dict[str, list[float]] = {"ddp": [], "fsdp": []}
        for i in range(args.warmup + args.steps):
            for name, (model, optimizer) in runs.items():
                dist.barrier()
                t0 = time.perf_counter()
                step(model, optimizer)
                dist.barrier()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
            if i == 0:
                memory = {name: memory_of(m, o) for name, (m, o) in runs.items()}
        n_params = sum(p.numel() for p in ddp_model.parameters())
        row = {"params": n_params, "world_size": world, "memory_bytes_per_rank": memory}
        if args.steps:
            row["step_s"] = {k: statistics.median(v) for k, v in times.items()}
            row["step_ratio_fsdp_vs_ddp"] = statistics.median(
                f / d for f, d in zip(times["fsdp"], times["ddp"])
            )
        results[arch] = row
        del runs, ddp, ddp_model, fsdp_model
    if rank == 0:
        print(f"{world} ranks, preset {args.preset}, B={args.batch_size} T={args.block_size}")
        header = f"{'arch':<14}{'params':>12}{'DDP MiB':>10}{'FSDP MiB':>10}{'FSDP/DDP':>10}"
        print(header + (f"{'DDP s':>9}{'FSDP s':>9}{'time ratio':>12}" if args.steps else ""))
        for arch, row in results.items():
            mem = {k: sum(v.values()) / 2**20 for k, v in row["memory_bytes_per_rank"].items()}
            line = (
                f"{arch:<14}{row['params']:>12,}{mem['ddp']:>10.1f}{mem['fsdp']:>10.1f}"
                f"{mem['fsdp'] / mem['ddp']:>10.3f}"
            )
            if args.steps:
                s = row["step_s"]
                line += f"{s['ddp']:>9.3f}{s['fsdp']:>9.3f}{row['step_ratio_fsdp_vs_ddp']:>12.3f}"
            print(line)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
