"""torch.distributed setup: the same training command runs alone or under `torchrun`,
with DistributedDataParallel (full replicas) or FSDP2 (`fully_shard`: sharded parameters,
gradients and optimizer state)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from modformer.devices import resolve_device  # noqa: F401  (re-exported)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives and all_gather_object use it
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=dist.get_world_size(),
    )


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of blocks (`model.transformer.h` for every modformer architecture)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    blocks = getattr(base, "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no `transformer.h` block list to shard; "
            "parallel=fsdp supports the modformer gpt, mom and moduleformer models"
        )
    return blocks


def shard_model(model: nn.Module, precision: str) -> None:
    """FSDP2, in place: each block is one `fully_shard` unit (its parameters are gathered
    just for its forward and backward), the root unit holds the rest (embeddings, final
    norm, tied LM head).

    precision=bf16 uses FSDP's mixed precision: parameters are cast to bf16 for compute,
    gradients are reduced in fp32 and the sharded master weights stay fp32.

    Routed models select different experts (or skip modules) on different ranks; a module
    that got no token on one rank has no gradient there. FSDP reduce-scatters the gradients
    of a unit as one flat buffer, so every rank must contribute every parameter:
    `set_reduce_scatter_unused_params(True)` makes a rank without a gradient send zeros.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    config = getattr(model, "config", None)
    if getattr(config, "routing_reg_weight", 0) > 0:
        # ModuleFormer's regulariser reads router weights outside the blocks' forward,
        # where FSDP holds only this rank's shard of them.
        raise ValueError(
            "parallel=fsdp cannot train with routing_reg_weight > 0 (the regulariser reads "
            "sharded router weights outside the block's forward); use parallel=ddp"
        )
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy)
    # The root's parameters (the tied embedding/head) are needed again at the start of
    # backward: keep them gathered after forward instead of gathering twice.
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    model.set_reduce_scatter_unused_params(True)


@torch.no_grad()
def ranks_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """All ranks hold identical parameters (DDP must keep them so): compare a checksum."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    checksum = torch.stack(
        [
            flat.sum(),
            (flat * torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)).sum(),
        ]
    )
    gathered = [torch.zeros_like(checksum) for _ in range(info.world_size)]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)
