"""Training throughput and model FLOPs utilisation (MFU) of the vanilla GPT.

MFU = achieved model FLOP/s / the matmul peak measured in the same run, with model FLOPs
per token = 6 * (non-embedding parameters) + 12 * n_layer * n_embd * T (attention scores
and values, forward + backward; the PaLM appendix B formula).

    python bench/train_throughput.py --presets tiny d512 --steps 5
"""

from __future__ import annotations

import argparse
import json

import torch

from common import matmul_peak_flops, median_time
from modformer.models.gpt import GPTConfig, GPTForCausalLM


def flops_per_token(config: GPTConfig, block_size: int) -> float:
    model = GPTForCausalLM(config)
    non_embedding = (
        sum(p.numel() for p in model.parameters())
        - model.transformer.wpe.weight.numel()
        - model.transformer.wte.weight.numel()
    )
    # The tied LM head is a real matmul even though its weight is the embedding.
    head = config.n_embd * config.vocab_size
    return 6 * (non_embedding + head) + 12 * config.n_layer * config.n_embd * block_size


def bench_preset(
    preset: str, batch_size: int, block_size: int, steps: int, device: torch.device
) -> dict:
    torch.manual_seed(0)
    config = GPTConfig.from_preset(preset, vocab_size=4096, n_positions=max(block_size, 256))
    model = GPTForCausalLM(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, config.vocab_size, (batch_size, block_size), device=device)

    def step() -> None:
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = median_time(step, device, warmup=2, repeats=steps)
    tokens = batch_size * block_size
    achieved = flops_per_token(config, block_size) * tokens / seconds
    return {
        "preset": preset,
        "batch": batch_size,
        "block": block_size,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "model_flops_per_s": achieved,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "d512"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", help="write results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = matmul_peak_flops(device)
    rows = [
        bench_preset(pr, args.batch_size, args.block_size, args.steps, device)
        for pr in args.presets
    ]
    print(
        f"device {device}, threads {torch.get_num_threads()}, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    print(f"{'preset':<8} {'tokens/s':>10} {'step (s)':>9} {'GFLOP/s':>9} {'MFU':>6}")
    for r in rows:
        r["mfu"] = r["model_flops_per_s"] / peak
        print(
            f"{r['preset']:<8} {r['tokens_per_s']:>10,.0f} {r['step_s']:>9.3f} {r['model_flops_per_s'] / 1e9:>9.1f} {r['mfu']:>6.1%}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
