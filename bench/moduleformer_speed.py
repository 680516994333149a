"""Benchmark: inference latency and throughput of `modformer reproduce moduleformer-vs-dense`'s
four arms (ModuleFormer Table 2's "50% latency, 2x throughput" claim), on an idle machine.

The experiment times its trained seed-0 models at the end of a run that shares the machine
with training; this script times the same four architectures (`ARMS` of the experiment,
the corpus's 4096-token vocabulary) freshly initialised, so it can be re-run alone. Weights
do not change the cost: every arm runs a fixed top-k, so a forward does the same work
whatever the router picks. Latency: a no-grad forward of ``--latency-batch`` x
``--block-size`` tokens; throughput: tokens/s of a forward of ``--throughput-batch`` x
``--block-size``. The arms are timed in turn (A B C D A B C D ...), ``--rounds`` rounds
after one warm-up call each; ratios to the baseline (the dense GPT of equal active FLOPs)
are medians of the per-round ratios.

    .venv/bin/python bench/moduleformer_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics

import torch

from modformer.experiments.moduleformer_vs_dense import ARMS, BASELINE, interleaved_forward_times
from modformer.models.registry import build_config, build_model


def build_arm(model: dict, vocab_size: int):
    overrides = {**model.get("overrides", {}), "vocab_size": vocab_size}
    config = build_config(model["arch"], model["preset"], **overrides)
    return build_model(config).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--rounds", type=int, default=15, help="timing rounds (default 15)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence (128)")
    p.add_argument("--latency-batch", type=int, default=1, help="sequences for latency (1)")
    p.add_argument("--throughput-batch", type=int, default=16, help="sequences (default 16)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary (default 4096)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {arm: build_arm(model, args.vocab_size) for arm, (_, model) in ARMS.items()}
    ids = torch.randint(0, args.vocab_size, (args.throughput_batch, args.block_size))
    latency = interleaved_forward_times(models, ids[: args.latency_batch], args.rounds)
    bulk = interleaved_forward_times(models, ids, args.rounds)
    print(
        f"threads {args.threads}, {args.rounds} rounds; latency: {args.latency_batch} x "
        f"{args.block_size} tokens; throughput: {args.throughput_batch} x {args.block_size}"
    )
    print("| arm | params | latency ms | latency / baseline | tokens/s | throughput / baseline |")
    print("|---|---|---|---|---|---|")
    for arm, model in models.items():
        lat = statistics.median(latency[arm])
        lat_ratio = statistics.median(a / b for a, b in zip(latency[arm], latency[BASELINE]))
        tput = ids.numel() / statistics.median(bulk[arm])
        tput_ratio = statistics.median(b / a for a, b in zip(bulk[arm], bulk[BASELINE]))
        print(
            f"| {arm} | {model.num_parameters() / 1e6:.2f}M | {1000 * lat:.1f} | "
            f"{lat_ratio:.2f} | {tput:,.0f} | {tput_ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
