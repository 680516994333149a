"""Benchmark: a MoM training step vs a dense stack of equal FLOPs vs an official-style loop.

Three models, built once, stepped (forward + backward, fp32) on the same input in the
same run, repeats interleaved (ours, dense, official, ours, ...):

- ``ours``: `MoMModel` with one chunk of ``--modules`` N = 4 attention and 4 FFN modules
  (K2H4S by default): GRU routers, grouped-GEMM module pools, SDPA attention
  (src/modformer/models/mom). Embedding lookup and LM head are left out (the input is
  a batch of embeddings); the position embedding and final LayerNorm stay, as in dense.
- ``dense``: a `GPTModel` of H blocks (same width, heads, sequence, SDPA causal
  attention) whose FFN hidden width is chosen so that its matmul FLOPs per token equal
  MoM's, routers included: every block does ``8 d^2`` (Q, K, V, O) + ``4 d h`` (FFN)
  multiply-adds x 2, MoM's step h does ``K^A_h (8 d^2) + K^F_h (4 d d_ff)`` x 2 for its
  measured average numbers of non-SKIP modules per token ``K^A_h``, ``K^F_h``, plus its
  two GRU routers. The attention core (``QK^T``, ``PV``) is the same in both: H layers
  of ``n_head`` heads over the same sequence. So the two do the same matmul work per
  token; the time ratio is what routing, dispatch and the grouped GEMMs cost.
  ``dense-modules`` is the same with the router FLOPs left out of the match, i.e. a
  vanilla model doing exactly MoM's module work; its ratio also charges the routers.
- ``official``: MoM written the way gzhch/Mixture-of-Modules (``mom/model.py``) writes
  it, with the weights of ``ours``: a Python loop over modules, ``torch.where`` on a
  one-hot mask and ``.tolist()`` to gather each module's tokens, a LayerNorm and Linear
  per module, ``qkv[idx] += ...`` / ``index_add_`` to scatter back, and eager attention
  that materialises the T x T scores. Its output is checked against ours.

Routing. The routers are the model's own at initialisation (random), optionally with
``--skip-bias`` added to every router's SKIP logit and ``--imbalance`` (std of a random
per-module logit bias, fixed per router) to make module loads uneven as in the paper's
Figure 6. The script prints the average number of non-SKIP modules a token runs per
step and the fraction of tokens whose picks include SKIP (paper Fig. 6, MoM-medium:
0.08-0.91 per step); FLOPs are counted from those measured numbers.

FLOPs are counted analytically (2 per multiply-add, matmuls only; LayerNorm, softmax,
activations and biases left out), forward pass per token; a training step is 3x that.

    python bench/mom_step.py                       # B=8 T=256 d=512 8 heads, [4] K2H4S
    python bench/mom_step.py --device cuda --dtype bf16 --batch 16
    python bench/mom_step.py --backend loop        # ours with the per-module loop backend
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common import interleaved_times, paired_ratio, print_ratio_table, ratio_results
from modformer.models.gpt import GPTConfig
from modformer.models.gpt.modeling_gpt import GPTModel
from modformer.models.mom import MoMConfig
from modformer.models.mom.modeling_mom import MoMModel, RoutingStep
from modformer.nn.experts import EXPERT_BACKENDS, experts_backend
from modformer.nn.routing import RoutingDecision

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# ---- FLOP counting ------------------------------------------------------------------


def attention_core_flops(d: int, seq: int) -> float:
    """QK^T and PV of one causal layer per token: 2 * 2 * d * (average keys seen)."""
    return 4 * d * (seq + 1) / 2


def mom_flops_per_token(config: MoMConfig, routing: list[RoutingStep], seq: int) -> dict:
    """Forward matmul FLOPs per token of one chunk, from the measured module counts."""
    d, d_ff, r = config.n_embd, config.d_inner, config.router_dim
    num_choices = routing[0].attn.num_columns  # the router's outputs: modules (+ SKIP)
    attn = ffn = router = 0.0
    for step in routing:
        attn += modules_per_token(step.attn) * 2 * (4 * d * d)
        ffn += modules_per_token(step.ffn) * 2 * (2 * d * d_ff)
        # Two GRU routers: input gates (d -> 3r), state gates (r -> 3r, none on the zero
        # state of the first step) and the output layer (r -> choices).
        state_gates = 0 if step.step == 0 else 3 * r * r
        router += 2 * 2 * (3 * d * r + state_gates + r * num_choices)
    core = len(routing) * attention_core_flops(d, seq)
    return {"attn_modules": attn, "ffn_modules": ffn, "routers": router, "attn_core": core}


def dense_flops_per_token(d: int, d_ff: int, n_layer: int, seq: int) -> dict:
    return {
        "attn_proj": n_layer * 2 * 4 * d * d,
        "ffn": n_layer * 2 * 2 * d * d_ff,
        "attn_core": n_layer * attention_core_flops(d, seq),
    }


def matching_ffn_width(matmul_flops: float, d: int, n_layer: int) -> int:
    """FFN width (a multiple of 8) of a dense block stack doing `matmul_flops` per token
    in its projections: n_layer * (8 d^2 + 4 d h) = matmul_flops."""
    width = (matmul_flops / n_layer - 8 * d * d) / (4 * d)
    if width < 8:
        raise ValueError(
            f"MoM does fewer matmul FLOPs per layer ({matmul_flops / n_layer:.3g}) than a dense "
            "layer's attention projections alone; no dense stack of equal FLOPs exists"
        )
    return 8 * round(width / 8)


def modules_per_token(decision: RoutingDecision) -> float:
    """Average number of non-SKIP picks per token of a routing decision."""
    return decision.modules_run_per_token().float().mean().item()


# ---- official-style MoM (gzhch/Mixture-of-Modules, mom/model.py) --------------------


class OfficialGRURouter(nn.Module):
    """`GRUTokenRouter`: GRU cell over depth (state starts at zeros), softmax output."""

    def __init__(self, n_embd: int, router_dim: int, num_choices: int):
        super().__init__()
        self.router_dim = router_dim
        self.x2h = nn.Linear(n_embd, 3 * router_dim)
        self.h2h = nn.Linear(router_dim, 3 * router_dim)
        self.router = nn.Linear(router_dim, num_choices)

    def forward(self, x, h):
        if h is None:
            h = torch.zeros((x.shape[0], self.router_dim), dtype=x.dtype, device=x.device)
        i_r, i_i, i_n = self.x2h(x).chunk(3, -1)
        h_r, h_i, h_n = self.h2h(h).chunk(3, -1)
        resetgate = torch.sigmoid(i_r + h_r)
        inputgate = torch.sigmoid(i_i + h_i)
        newgate = torch.tanh(i_n + resetgate * h_n)
        h = newgate + inputgate * (h - newgate)
        return F.softmax(self.router(h), dim=-1), h


def _top_k(scores: torch.Tensor, k: int, num_classes: int):
    top_score, top_ids = torch.topk(scores, k, dim=-1)
    top_score = top_score / top_score.sum(dim=-1, keepdim=True)
    expert_mask = F.one_hot(top_ids, num_classes=num_classes).permute(2, 1, 0)
    return top_score, expert_mask


class OfficialAttention(nn.Module):
    """`MoTAttention` (non-anchor): loop over modules, eager T x T attention."""

    def __init__(self, config: MoMConfig, num_modules: int):
        super().__init__()
        d = config.n_embd
        self.num_attn, self.k = num_modules, config.K
        self.embed_dim, self.num_heads, self.head_dim = d, config.n_head, d // config.n_head
        self.attention_layernorm = nn.ModuleList(nn.LayerNorm(d) for _ in range(num_modules))
        self.c_attn = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(num_modules))
        self.c_proj = nn.ModuleList(nn.Linear(d, d) for _ in range(num_modules))
        self.router = OfficialGRURouter(d, config.router_dim, num_modules + 1)
        n = config.n_positions
        self.register_buffer("bias", torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None])

    def _attn(self, query, key, value):
        attn_weights = query @ key.transpose(-1, -2) / value.size(-1) ** 0.5
        q_len, k_len = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, k_len - q_len : k_len, :k_len]
        mask_value = torch.finfo(attn_weights.dtype).min
        attn_weights = torch.where(causal_mask, attn_weights, mask_value)
        attn_weights = F.softmax(attn_weights, dim=-1)
        return attn_weights @ value

    def forward(self, hidden_states, routing_states):
        bsz, q_len, _ = hidden_states.size()
        hidden_states = hidden_states.view(bsz * q_len, -1)
        routing_score, routing_states = self.router(hidden_states, routing_states)
        top_score, expert_mask = _top_k(routing_score, self.k, routing_score.shape[-1])
        qkv_states = hidden_states.new_zeros(bsz * q_len, 3 * self.embed_dim)
        for module_idx in range(self.num_attn):
            idx2, idx = torch.where(expert_mask[module_idx])
            if len(idx) == 0:
                continue
            current_state = hidden_states[None, idx.tolist()].reshape(-1, self.embed_dim)
            current_state = self.attention_layernorm[module_idx](current_state)
            qkv_states[idx] += self.c_attn[module_idx](current_state)
        query, key, value = qkv_states.view(bsz, q_len, -1).split(self.embed_dim, dim=2)
        query, key, value = (
            t.view(bsz, q_len, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
            for t in (query, key, value)
        )
        attn_output = self._attn(query, key, value)
        attn_output = attn_output.permute(0, 2, 1, 3).reshape(bsz * q_len, -1)
        output_states = attn_output.new_zeros(bsz * q_len, self.embed_dim)
        for module_idx in range(self.num_attn):
            idx2, idx = torch.where(expert_mask[module_idx])
            if len(idx) == 0:
                continue
            current_state = attn_output[None, idx.tolist()].reshape(-1, self.embed_dim)
            o_state = self.c_proj[module_idx](current_state) * top_score[idx, idx2, None]
            output_states.index_add_(0, idx, o_state)
        return output_states.view(bsz, q_len, -1), routing_states


class OfficialMLP(nn.Module):
    """`MoTMLP` (non-anchor): loop over FFN modules."""

    def __init__(self, config: MoMConfig, num_modules: int):
        super().__init__()
        d, d_ff = config.n_embd, config.d_inner
        self.num_ffn, self.k, self.hidden_size = num_modules, config.K, d
        self.ffn_layernorm = nn.ModuleList(nn.LayerNorm(d) for _ in range(num_modules))
        self.c_fc = nn.ModuleList(nn.Linear(d, d_ff) for _ in range(num_modules))
        self.c_proj = nn.ModuleList(nn.Linear(d_ff, d) for _ in range(num_modules))
        self.router = OfficialGRURouter(d, config.router_dim, num_modules + 1)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x, routing_states):
        bsz, q_len, _ = x.shape
        x = x.view(bsz * q_len, -1)
        routing_score, routing_states = self.router(x, routing_states)
        top_score, expert_mask = _top_k(routing_score, self.k, routing_score.shape[-1])
        output_states = x.new_zeros(bsz * q_len, self.hidden_size)
        for module_idx in range(self.num_ffn):
            idx2, idx = torch.where(expert_mask[module_idx])
            if len(idx) == 0:
                continue
            current_state = x[None, idx.tolist()].reshape(-1, self.hidden_size)
            current_state = self.ffn_layernorm[module_idx](current_state)
            current_state = self.c_proj[module_idx](self.act(self.c_fc[module_idx](current_state)))
            current_state = current_state * top_score[idx, idx2, None]
            output_states.index_add_(0, idx, current_state)
        return output_states.view(bsz, q_len, -1), routing_states


class OfficialStyleMoM(nn.Module):
    """Position embedding, one `MoTBlock` (H steps), final LN: the official layout."""

    def __init__(self, config: MoMConfig, num_modules: int):
        super().__init__()
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.mot_attn = OfficialAttention(config, num_modules)
        self.mot_ffn = OfficialMLP(config, num_modules)
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.steps = config.H

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        hidden_states = inputs_embeds + self.wpe(positions)[None]
        attn_state = ffn_state = None
        for _ in range(self.steps):
            out, attn_state = self.mot_attn(hidden_states, attn_state)
            hidden_states = hidden_states + out
            out, ffn_state = self.mot_ffn(hidden_states, ffn_state)
            hidden_states = hidden_states + out
        return self.ln_f(hidden_states)

    @torch.no_grad()
    def load_from(self, model: MoMModel) -> OfficialStyleMoM:
        """Copy the weights of a one-chunk `MoMModel` (stacked (N, d_in, d_out) pools)."""
        chunk = model.chunks[0]
        self.wpe.weight.copy_(model.wpe.weight)
        self.ln_f.load_state_dict(model.ln_f.state_dict())
        for pool, lns, linears in (
            (
                chunk.attn,
                self.mot_attn.attention_layernorm,
                (("qkv", self.mot_attn.c_attn), ("proj", self.mot_attn.c_proj)),
            ),
            (
                chunk.ffn,
                self.mot_ffn.ffn_layernorm,
                (("fc", self.mot_ffn.c_fc), ("proj", self.mot_ffn.c_proj)),
            ),
        ):
            for m, ln in enumerate(lns):
                ln.weight.copy_(pool.ln_weight[m])
                ln.bias.copy_(pool.ln_bias[m])
            for name, layers in linears:
                for m, layer in enumerate(layers):
                    layer.weight.copy_(getattr(pool, f"{name}_weight")[m].t())
                    layer.bias.copy_(getattr(pool, f"{name}_bias")[m])
        for ours, theirs in (
            (chunk.policy.attn_router, self.mot_attn.router),
            (chunk.policy.ffn_router, self.mot_ffn.router),
        ):
            theirs.x2h.load_state_dict(ours.x2h.state_dict())
            theirs.h2h.load_state_dict(ours.h2h.state_dict())
            theirs.router.load_state_dict(ours.out.state_dict())
        return self


# ---- benchmark ----------------------------------------------------------------------


def bias_router_logits(model: MoMModel, skip_bias: float, imbalance: float, seed: int) -> None:
    """Shift every router's output bias: SKIP by `skip_bias`, modules by N(0, imbalance)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for chunk in model.chunks:
            for router in (chunk.policy.attn_router, chunk.policy.ffn_router):
                bias = router.out.bias
                bias[:-1] += imbalance * torch.randn(bias.shape[0] - 1, generator=gen)
                if model.config.skip:
                    bias[-1] += skip_bias


def training_step(
    model: nn.Module, forward: Callable[[], torch.Tensor], x: torch.Tensor, grad: torch.Tensor
) -> Callable[[], None]:
    """Forward, backward with `grad` as the output gradient; fresh gradients each call."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        forward().backward(grad)

    return step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--modules", type=int, default=4, help="N: modules per type in the chunk")
    p.add_argument("--mom", default="K2H4S", help="MoM name KaHb[S]")
    p.add_argument("--router-dim", type=int, default=256)
    p.add_argument("--skip-bias", type=float, default=0.0, help="added to the SKIP logit")
    p.add_argument("--imbalance", type=float, default=0.0, help="std of per-module logit bias")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-official", action="store_true", help="skip the official-style model")
    p.add_argument(
        "--backend",
        choices=EXPERT_BACKENDS,
        default="grouped",
        help="experts backend of ours: grouped GEMMs (default) or the per-module loop",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    with experts_backend(args.backend):
        run(args)


def run(args: argparse.Namespace) -> None:
    if args.modules < 2:
        raise SystemExit("--modules must be at least 2 (a chunk of 1 is a fixed block)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    config = MoMConfig(
        vocab_size=256,
        n_positions=args.seq,
        n_embd=args.d_model,
        n_head=args.heads,
        chunks=f"[{args.modules}]",
        mom=args.mom,
        router_dim=args.router_dim,
    )
    ours = MoMModel(config)
    bias_router_logits(ours, args.skip_bias, args.imbalance, args.seed)
    official = OfficialStyleMoM(config, args.modules).load_from(ours)
    ours, official = ours.to(device, dtype).train(), official.to(device, dtype).train()

    gen = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch, args.seq, args.d_model)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    grad = torch.randn(shape, generator=gen).to(device, dtype)

    with torch.no_grad():
        out = ours(inputs_embeds=x, use_cache=False, return_routing=True)
        routing = list(out.routing)
        max_diff = (out.last_hidden_state - official(x)).abs().max().item()
    steps = [
        {
            "attn_modules_per_token": modules_per_token(s.attn),
            "ffn_modules_per_token": modules_per_token(s.ffn),
            "attn_tokens_with_skip": (~s.attn.picks_module()).any(-1).float().mean().item(),
            "ffn_tokens_with_skip": (~s.ffn.picks_module()).any(-1).float().mean().item(),
        }
        for s in routing
    ]

    d, H = args.d_model, config.H
    mom_flops = mom_flops_per_token(config, routing, args.seq)
    mom_matmul = mom_flops["attn_modules"] + mom_flops["ffn_modules"] + mom_flops["routers"]
    widths = {
        "dense": matching_ffn_width(mom_matmul, d, H),
        "dense-modules": matching_ffn_width(mom_matmul - mom_flops["routers"], d, H),
    }
    dense_models, dense_flops = {}, {}
    for name, width in widths.items():
        gpt = GPTConfig(
            vocab_size=256,
            n_positions=args.seq,
            n_embd=d,
            n_layer=H,
            n_head=args.heads,
            n_inner=width,
        )
        dense_models[name] = GPTModel(gpt).to(device, dtype).train()
        dense_flops[name] = dense_flops_per_token(d, width, H, args.seq)

    x.requires_grad_(True)  # the chunk's input has layers below it in a real model
    fns = {
        "ours": training_step(
            ours, lambda: ours(inputs_embeds=x, use_cache=False).last_hidden_state, x, grad
        )
    }
    for name, model in dense_models.items():
        fns[name] = training_step(
            model, lambda m=model: m(inputs_embeds=x, use_cache=False).last_hidden_state, x, grad
        )
    if not args.no_official:
        fns["official"] = training_step(official, lambda: official(x), x, grad)
    times = interleaved_times(fns, device, args.warmup, args.repeats)

    tokens = args.batch * args.seq
    total = {"ours": sum(mom_flops.values()), "official": sum(mom_flops.values())}
    total.update({name: sum(f.values()) for name, f in dense_flops.items()})
    results = ratio_results(times, {n: 3 * f * tokens for n, f in total.items()}, device)
    summary = {"ours_over_dense": results["ours"]["wall_ratio_vs_dense"]}
    if device.type == "cpu":
        summary["ours_over_dense_cpu_time"] = results["ours"]["cpu_ratio_vs_dense"]
    summary["ours_over_dense_modules"] = paired_ratio(
        times["ours"]["wall"], times["dense-modules"]["wall"]
    )
    if "official" in times:
        summary["official_over_ours"] = paired_ratio(
            times["official"]["wall"], times["ours"]["wall"]
        )
    summary["max_abs_diff_ours_vs_official"] = max_diff

    print(
        f"MoM training step (fwd+bwd), chunk [{args.modules}] {config.mom_name}, B={args.batch} "
        f"T={args.seq} d={d} heads={args.heads} router_dim={args.router_dim} {args.dtype} on "
        f"{device} ({torch.get_num_threads()} threads, torch {torch.__version__})"
    )
    print("routing (per step): non-SKIP modules per token, tokens whose picks include SKIP")
    for h, s in enumerate(steps):
        print(
            f"  step {h}: attn {s['attn_modules_per_token']:.3f} ({s['attn_tokens_with_skip']:.0%}"
            f" SKIP)  ffn {s['ffn_modules_per_token']:.3f} ({s['ffn_tokens_with_skip']:.0%} SKIP)"
        )
    print("forward matmul MFLOP per token:")
    print(
        "  MoM  "
        + "  ".join(f"{k} {v / 1e6:.3f}" for k, v in mom_flops.items())
        + f"  total {total['ours'] / 1e6:.3f}"
    )
    for name, f in dense_flops.items():
        print(
            f"  {name} (FFN width {widths[name]})  "
            + "  ".join(f"{k} {v / 1e6:.3f}" for k, v in f.items())
            + f"  total {total[name] / 1e6:.3f}"
        )
    print_ratio_table(results, device, "model", 15)
    for key, value in summary.items():
        print(f"{key}: {value:.4g}")
    if args.json:
        config_out = {k: v for k, v in vars(args).items() if k != "json"}
        config_out.update(torch=torch.__version__, threads=torch.get_num_threads())
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": config_out,
                    "routing": steps,
                    "flops_per_token": {"mom": mom_flops, **dense_flops},
                    "ffn_widths": widths,
                    "results": results,
                    "summary": summary,
                },
                f,
                indent=2,
            )
    if not max_diff < 1e-3:
        print(f"WARNING: ours and official-style outputs differ by {max_diff:.3g}")


if __name__ == "__main__":
    main()
