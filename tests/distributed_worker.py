"""Run under torchrun by tests/test_distributed.py: a list of jobs in one process group, so
that the (slow) process start-up is paid once for many small trainings.

    torchrun --nproc_per_node 2 tests/distributed_worker.py SPEC.json

SPEC.json: {"results": PATH, "jobs": [...]}, each job one of
  {"op": "train", "name": N, "args": ["key=value", ...], "resume": false}
  {"op": "truncate", "src": DIR, "dst": DIR, "step": S}   (rank 0, see `truncate_run`)
  {"op": "unused_params"}  {"op": "mixed_precision"}  {"op": "grad_parity", "arch": A, "overrides": {}}
Rank 0 writes {name: result} to PATH.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def truncate_run(src: Path, dst: Path, step: int) -> None:
    """Copy a finished run's out_dir as it was on disk right after checkpoint `step`
    (later checkpoints, the final model and final.json removed): the state a kill leaves."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if ckpt.name.startswith("step_") and int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(dst / "model", ignore_errors=True)
    (dst / "final.json").unlink(missing_ok=True)


class _ToyBlock(nn.Module):
    """Two 'experts'; a rank that routes no token to the second never calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor, use_second: bool) -> torch.Tensor:
        y = self.experts[0](x)
        if use_second:
            y = y + self.experts[1](x)
        return y


class _ToyModel(nn.Module):
    base_model_prefix = "transformer"

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList(_ToyBlock() for _ in range(2))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, use_second: bool) -> torch.Tensor:
        for block in self.transformer.h:
            x = torch.tanh(block(x, use_second))
        return self.head(x).square().mean()


def unused_params(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 leaves a whole expert unused: FSDP must still reduce-scatter (zeros for it)
    and the gradients must be the mean of every rank's full-model gradients."""
    from modformer.train.distributed import shard_model

    torch.manual_seed(0)
    reference = _ToyModel()
    sharded = _ToyModel()
    sharded.load_state_dict(reference.state_dict())
    shard_model(sharded, "fp32")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    use_second = rank == 0
    reference(x, use_second).backward()
    sharded(x, use_second).backward()
    max_error = 0.0
    for p_ref, p in zip(reference.parameters(), sharded.parameters()):
        grad = p_ref.grad if p_ref.grad is not None else torch.zeros_like(p_ref)
        dist.all_reduce(grad)
        grad /= world
        max_error = max(max_error, (p.grad.full_tensor() - grad).abs().max().item())
    unused_here = [n for n, p in reference.named_parameters() if p.grad is None]
    return {"max_grad_error": max_error, "unused_on_rank": unused_here}


def grad_parity(rank: int, world: int, arch: str, overrides: dict[str, Any]) -> float:
    """The largest difference, relative to the gradient's scale, between FSDP's gradient of
    each parameter and the mean over ranks of the unsharded model's gradients (routing
    and auxiliary losses included), each rank on its own batch."""
    from modformer.models.registry import build_config, build_model
    from modformer.train.distributed import shard_model

    torch.manual_seed(0)
    reference = build_model(build_config(arch, "tiny", vocab_size=64, **overrides))
    sharded = build_model(reference.config)
    sharded.load_state_dict(reference.state_dict())
    shard_model(sharded, "fp32")
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    reference(input_ids=x, labels=x, use_cache=False).loss.backward()
    sharded(input_ids=x, labels=x, use_cache=False).loss.backward()
    worst = 0.0
    for p_ref, p in zip(reference.parameters(), sharded.parameters()):
        grad = p_ref.grad if p_ref.grad is not None else torch.zeros_like(p_ref)
        dist.all_reduce(grad)
        grad /= world
        error = (p.grad.full_tensor() - grad).abs().max() / grad.abs().max().clamp_min(1e-12)
        worst = max(worst, error.item())
    return worst


def mixed_precision() -> dict[str, Any]:
    """bf16 under FSDP: blocks compute with bf16 parameters, the sharded master weights
    and their gradients stay fp32."""
    from modformer.models.registry import build_config, build_model
    from modformer.train.distributed import shard_model

    torch.manual_seed(0)
    model = build_model(
        build_config("gpt", "tiny", vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_positions=32)
    )
    shard_model(model, "bf16")
    seen: list[torch.dtype] = []
    first_child = next(iter(model.transformer.h[0].children()))
    first_child.register_forward_hook(
        lambda module, args, out: seen.append(next(module.parameters()).dtype)
    )
    x = torch.randint(0, 64, (2, 16))
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    return {
        "compute_dtype": str(seen[0]),
        "master_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()}),
        "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
    }


def main(spec_path: str) -> None:
    from modformer.train.config import load_train_config
    from modformer.train.trainer import train

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {}
    for job in spec["jobs"]:
        op = job["op"]
        if op == "train":
            cfg = load_train_config(None, job["args"])
            results[job["name"]] = train(cfg, resume=job.get("resume", False))
        elif op == "truncate" and rank == 0:
            truncate_run(Path(job["src"]), Path(job["dst"]), job["step"])
        elif op == "unused_params":
            results["unused_params"] = unused_params(rank, world)
            results[f"unused_params_rank{rank}"] = results["unused_params"]
        elif op == "grad_parity":
            results[f"grad_parity_{job['arch']}"] = grad_parity(
                rank, world, job["arch"], job["overrides"]
            )
        elif op == "mixed_precision":
            results["mixed_precision"] = mixed_precision()
        dist.barrier()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        merged = {k: v for r in reversed(gathered) for k, v in r.items()}
        Path(spec["results"]).write_text(json.dumps(merged, indent=1, default=str))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
