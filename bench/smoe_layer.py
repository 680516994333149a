"""Benchmark: the SMoE layer (`SparseMoE`) vs a dense FFN of the same active FLOPs.

Three layers, built once and stepped (forward + backward, input gradient included) on
the same tokens in the same run, repeats interleaved (ours, dense, loop, ours, ...):

- ``ours``: `modformer.nn.moe.SparseMoE` (router ``TopK(softmax(A relu(B x)))``, pairs
  sorted by expert, two grouped GEMMs, gated sum back to the tokens).
- ``dense``: a dense MLP ``d -> k * D_ffd -> d`` (no biases, same activation): exactly
  the expert FLOPs a token does (k experts of ``d -> D_ffd -> d``). The router's FLOPs
  (``d -> D_rtr -> N``) are printed next to them; the dense FFN has no router, so its
  cost is part of what the ratio charges to the SMoE.
- ``loop``: the Hugging Face Mixtral eager layout, for context: a Python loop over
  experts, ``torch.where`` on a one-hot mask to find each expert's tokens, one
  ``nn.Linear`` pair per expert, ``index_add_`` to scatter back (same weights as ours;
  the outputs are compared).

FLOPs: 2 per multiply-add, matmuls only; a training step is 3x the forward.

Memory: the SMoE layer has N/k = 8 times the dense FFN's parameters, so 8 times its
weight gradients (64 MiB per step here). With glibc's defaults those buffers are
unmapped when freed and page-faulted in again on the next step; the benchmark runs
with freed memory retained, as the `modformer` CLI does (`modformer.utils.
retain_freed_memory`). MODFORMER_RETAIN_FREED_MEMORY=0 measures the glibc default.

    python bench/smoe_layer.py                          # 4096 tokens, d=512, 16 experts, k=2
    python bench/smoe_layer.py --device cuda --dtype bf16
    python bench/smoe_layer.py --backend loop          # ours with the per-expert loop backend
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common import (
    RETAINS_FREED_MEMORY,
    interleaved_times,
    paired_ratio,
    print_ratio_table,
    ratio_results,
)
from modformer.nn.activations import get_activation
from modformer.nn.experts import EXPERT_BACKENDS
from modformer.nn.mlp import MLP
from modformer.nn.moe import SparseMoE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LoopMoE(nn.Module):
    """Mixtral eager style (`MixtralSparseMoeBlock.forward`): loop over experts."""

    def __init__(self, moe: SparseMoE, activation: str):
        super().__init__()
        self.router, self.top_k = moe.router, moe.top_k
        num_experts, d, hidden = moe.w_in.shape
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d, hidden, bias=False),
                get_activation(activation),
                nn.Linear(hidden, d, bias=False),
            )
            for _ in range(num_experts)
        )
        with torch.no_grad():
            for e, expert in enumerate(self.experts):
                expert[0].weight.copy_(moe.w_in[e].t())
                expert[2].weight.copy_(moe.w_out[e].t())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        route = self.router(hidden_states)
        routing_weights = route.weights.to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(route.indices, len(self.experts)).permute(2, 1, 0)
        for expert_idx, expert in enumerate(self.experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_states.shape[-1])
            current_hidden = expert(current_state) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, current_hidden)
        return final


def training_step(module: nn.Module, forward: Callable[[], torch.Tensor], x, grad):
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        forward().backward(grad)

    return step


def breakdown_steps(moe: SparseMoE, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """fwd+bwd of each part of `moe` alone, on the routing of `x`: the router; the row
    movement (gather to pairs + weighted sum back); the expert GEMMs and activation on
    already gathered rows. Their ratios to the dense step say where the overhead goes."""
    with torch.no_grad():
        route = moe.router(x)
    gates = route.weights.detach().requires_grad_(True)
    pairs = moe.route(route.indices, gates, all_picked=True)
    rows = pairs.gather(x.detach()).requires_grad_(True)
    pair_grad = torch.randn_like(rows)

    def router() -> None:
        r = moe.router(x)
        (r.weights.sum() + r.logits.sum()).backward()

    def movement() -> None:
        pairs.combine(pairs.gather(x)).backward(grad)

    def experts() -> None:
        hidden = pairs.linear(rows, moe.w_in)
        pairs.linear(moe.act(hidden), moe.w_out).backward(pair_grad)

    def step(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            moe.zero_grad(set_to_none=True)
            x.grad = rows.grad = gates.grad = None
            fn()

        return run

    return {"router": step(router), "movement": step(movement), "experts": step(experts)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=1024, help="D_ffd")
    p.add_argument("--router-hidden", type=int, default=256, help="D_rtr")
    p.add_argument("--activation", default="gelu_new")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--no-loop", action="store_true", help="skip the loop-over-experts layer")
    p.add_argument(
        "--backend",
        choices=EXPERT_BACKENDS,
        default="grouped",
        help="experts backend of ours: grouped GEMMs (default) or the masked per-expert loop",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the parts of ours alone (router, row movement, expert GEMMs)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    d, k, hidden = args.d_model, args.top_k, args.expert_hidden
    moe = SparseMoE(
        d, args.experts, k, hidden, args.activation, args.router_hidden, backend=args.backend
    )
    dense = MLP(d, k * hidden, args.activation, bias=False)
    loop = LoopMoE(moe, args.activation)
    moe, dense, loop = (m.to(device, dtype).train() for m in (moe, dense, loop))

    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.tokens, d, generator=gen).to(device, dtype)
    grad = torch.randn(args.tokens, d, generator=gen).to(device, dtype)
    with torch.no_grad():
        y, route = moe(x)
        max_diff = (y - loop(x)).abs().max().item()
        load = torch.bincount(route.indices.flatten(), minlength=args.experts)
    x.requires_grad_(True)

    fns = {
        "ours": training_step(moe, lambda: moe(x)[0], x, grad),
        "dense": training_step(dense, lambda: dense(x), x, grad),
    }
    if not args.no_loop:
        fns["loop"] = training_step(loop, lambda: loop(x), x, grad)
    if args.breakdown:
        fns.update(breakdown_steps(moe, x, grad))
    times = interleaved_times(fns, device, args.warmup, args.repeats)

    expert_flops = 2 * k * 2 * d * hidden  # forward, per token
    router_flops = 2 * (d * args.router_hidden + args.router_hidden * args.experts)
    flops = {"ours": expert_flops + router_flops, "dense": expert_flops}
    flops["loop"] = flops["ours"]
    flops.update(router=router_flops, movement=0, experts=expert_flops)
    results = ratio_results(times, {n: 3 * f * args.tokens for n, f in flops.items()}, device)
    summary = {
        "ours_over_dense": results["ours"]["wall_ratio_vs_dense"],
        "router_flops_fraction_of_dense": router_flops / expert_flops,
        "max_abs_diff_ours_vs_loop": max_diff,
    }
    if device.type == "cpu":
        summary["ours_over_dense_cpu_time"] = results["ours"]["cpu_ratio_vs_dense"]
    if "loop" in times:
        summary["loop_over_ours"] = paired_ratio(times["loop"]["wall"], times["ours"]["wall"])

    print(
        f"SMoE layer fwd+bwd: {args.tokens} tokens, d={d}, {args.experts} experts, k={k}, "
        f"D_ffd={hidden}, D_rtr={args.router_hidden}, {args.dtype} on {device}, "
        f"{args.backend} experts "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}, freed memory "
        f"{'retained' if RETAINS_FREED_MEMORY else 'returned to the OS (glibc default)'})"
    )
    print(f"expert load (pairs per expert): min {load.min().item()} max {load.max().item()}")
    print(
        f"forward MFLOP per token: experts {expert_flops / 1e6:.3f} (= dense FFN "
        f"{d}->{k * hidden}->{d}), router {router_flops / 1e6:.3f} "
        f"({router_flops / expert_flops:.1%} of the experts)"
    )
    print_ratio_table(results, device, "layer", 8)
    for key, value in summary.items():
        print(f"{key}: {value:.4g}")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        config.update(
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            retains_freed_memory=RETAINS_FREED_MEMORY,
        )
        out = {"config": config, "results": results, "summary": summary}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
