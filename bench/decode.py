"""Benchmark: ModuleFormer decoding time per token at two context lengths.

A small ModuleFormer (the ``tiny`` preset, ``n_positions`` raised to fit the longest
context, a 256-token vocabulary so that the LM head does not hide the attention) is
prefilled with a random prompt of ``C`` tokens for each ``C`` in ``--contexts``; then
single-token decoding steps are timed, the cache cropped back to ``C`` after each step
so every measured step sees exactly ``C`` cached positions. A sample is
``--steps-per-sample`` consecutive steps; samples of all variants and contexts are
interleaved (round r times one sample of each), and the per-token time is the median
sample time over the rounds divided by the steps per sample. The figure of merit is time(C_max) / time(C_min): ~C_max/C_min
(4x for 2048/512) when the per-token cost is linear in the context, less when fixed
per-token costs (routers, FFN experts, LM head) matter, more when it is superlinear.

Variants (same weights, same model code; only the stick-breaking formula and the use of
the KV cache differ):

- ``ours``: `ModuleFormerForCausalLM` with its KV cache: the new token's routed queries
  attend to the cached keys with `stick_breaking_attention` (reverse cumulative sum
  along the C keys): O(C) per token and layer.
- ``official``: the same cached step with IBM/ModuleFormer's ``stickbreaking_att``
  formula (`official_stick_breaking` of bench/stick_breaking.py): every step builds
  C x C causal-mask and triangular matrices and takes the cumulative sum as a
  (1 x C) @ (C x C) matmul, as IBM's ``ModuleFormerAttention.forward`` does on each call
  (it keeps a key/value history, but rebuilds those matrices for the full context):
  O(C^2) per token and layer.
- ``official-nocache``: generation without a cache (``use_cache=False``, what IBM's code
  does when the history is off): every token re-runs the whole context through the
  model with the official formula, whose T x T x T matmul makes it O(C^3) per token.
  Fewer steps are timed (``--nocache-repeats``); ``--no-nocache`` skips it.

The outputs of the official variants are checked against ours (max |logit difference|).

    python bench/decode.py                             # contexts 512 and 2048, batch 1
    python bench/decode.py --contexts 512 1024 2048 --batch 4
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

import modformer.nn.moe as moe_module
from common import interleaved_times
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.outputs import output_cache
from stick_breaking import official_stick_breaking

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextmanager
def official_attention() -> Iterator[None]:
    """Run the MoA layers with IBM's stick-breaking formula instead of ours."""

    def official(q, k, v, key_padding_mask=None, block_size=None):
        if key_padding_mask is not None:
            raise ValueError("the official-style formula is benchmarked without padding")
        return official_stick_breaking(q, k, v)

    original = moe_module.stick_breaking_attention
    moe_module.stick_breaking_attention = official
    try:
        yield
    finally:
        moe_module.stick_breaking_attention = original


def cached_steps(model, cache, token: torch.Tensor, official: bool, steps: int) -> Callable:
    """`steps` decoding steps on the cache, each cropped off again: all see its length."""

    def run() -> torch.Tensor:
        for _ in range(steps):
            with torch.no_grad():
                if official:
                    with official_attention():
                        out = model(input_ids=token, cache=cache, use_cache=True)
                else:
                    out = model(input_ids=token, cache=cache, use_cache=True)
            cache.crop(-token.shape[1])
        return out.logits

    return run


def uncached_step(model, ids: torch.Tensor) -> Callable:
    """One token without a cache: the whole context goes through the model again."""

    def step() -> torch.Tensor:
        with torch.no_grad(), official_attention():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    return step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=25, help="timed samples per cached variant")
    p.add_argument("--steps-per-sample", type=int, default=4, help="decoding steps per sample")
    p.add_argument("--nocache-repeats", type=int, default=3)
    p.add_argument("--no-nocache", action="store_true", help="skip official-nocache")
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
    contexts = sorted(args.contexts)
    torch.manual_seed(args.seed)
    config = ModuleFormerConfig.from_preset(
        args.preset, vocab_size=args.vocab_size, n_positions=max(contexts) + 1
    )
    model = ModuleFormerForCausalLM(config).to(device, dtype).eval()

    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, args.vocab_size, (args.batch, max(contexts) + 1), generator=gen)
    prompt = prompt.to(device)
    token = prompt[:, -1:]
    cached: dict[str, Callable] = {}
    uncached: dict[str, Callable] = {}
    max_diff: dict[str, float] = {}
    for c in contexts:
        with torch.no_grad():
            cache = output_cache(model(input_ids=prompt[:, :c], use_cache=True))
        steps = args.steps_per_sample
        ours = cached_steps(model, cache, token, official=False, steps=steps)
        official = cached_steps(model, copy.deepcopy(cache), token, official=True, steps=steps)
        cached[f"ours@{c}"], cached[f"official@{c}"] = ours, official
        nocache = uncached_step(model, torch.cat([prompt[:, :c], token], 1))
        reference = ours()[:, -1]
        max_diff[f"official@{c}"] = (official()[:, -1] - reference).abs().max().item()
        if not args.no_nocache:
            uncached[f"official-nocache@{c}"] = nocache
            max_diff[f"official-nocache@{c}"] = (nocache()[:, -1] - reference).abs().max().item()

    times = interleaved_times(cached, device, args.warmup, args.repeats)
    if uncached:
        times.update(interleaved_times(uncached, device, 1, args.nocache_repeats))

    results = {}
    for name, t in times.items():
        steps = 1 if name in uncached else args.steps_per_sample
        results[name] = {
            "ms_per_token": 1e3 * statistics.median(t["wall"]) / steps,
            "min_ms_per_token": 1e3 * min(t["wall"]) / steps,
            "cpu_ms_per_token": 1e3 * statistics.median(t["cpu"]) / steps,
            "tokens": len(t["wall"]) * steps,
        }
    lo, hi = contexts[0], contexts[-1]
    summary = {}
    for variant in ("ours", "official", "official-nocache"):
        if f"{variant}@{hi}" in results:
            r_hi, r_lo = results[f"{variant}@{hi}"], results[f"{variant}@{lo}"]
            summary[f"{variant}_ratio_{hi}_over_{lo}"] = r_hi["ms_per_token"] / r_lo["ms_per_token"]
            summary[f"{variant}_ratio_{hi}_over_{lo}_cpu_time"] = (
                r_hi["cpu_ms_per_token"] / r_lo["cpu_ms_per_token"]
            )
    for name, diff in max_diff.items():
        summary[f"max_abs_logit_diff_{name}"] = diff

    print(
        f"ModuleFormer decoding ({args.preset} preset, n_embd={config.n_embd}, "
        f"n_layer={config.n_layer}, vocab {args.vocab_size}), batch {args.batch}, "
        f"{args.dtype} on {device} ({torch.get_num_threads()} threads, torch {torch.__version__})"
    )
    print(f"{'variant@context':<26}{'ms/token':>10}{'min ms':>10}{'CPU ms':>10}{'tokens':>8}")
    for name, r in results.items():
        print(
            f"{name:<26}{r['ms_per_token']:10.2f}{r['min_ms_per_token']:10.2f}"
            f"{r['cpu_ms_per_token']:10.2f}{r['tokens']:8d}"
        )
    for key, value in summary.items():
        print(f"{key}: {value:.4g}")
    if args.json:
        config_out = {k: v for k, v in vars(args).items() if k != "json"}
        config_out.update(torch=torch.__version__, threads=torch.get_num_threads())
        with open(args.json, "w") as f:
            json.dump({"config": config_out, "results": results, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
