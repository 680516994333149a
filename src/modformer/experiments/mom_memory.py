"""Memory as MoM Table 1 measures it: `modformer reproduce mom-memory` (trains nothing).

The paper's 12 memory figures (GPT-2 and MoM_E/I/P K3H1S/K3H2S/K2H6S at three sizes)
against two formulas over the assembled attention layers L of each model:

- ours (`model.cache_memory`, what `modformer cost --memory cache` prints): logits
  B*T*V + per layer keys and values 2*B*T*d (+ MoM's GRU router state), fp32;
- the paper's shape, fitted: logits B*T*V + 3*B*T*d per layer, fp32, with B*T = 10 x 1024
  tokens (`PAPER_TOKENS`) and GiB: the batch is not stated in the paper; this one makes
  the fit's logits term equal the paper's constant (about 1.92 GiB at every size).

Each figure is also given as the change against the GPT-2 row of its size. Then the same
formula is checked on our own CPU-scale models (`mom_vs_vanilla`'s 6-layer d = 128 GPT
and its MoM_E/I/P on ``[1-4-1]``, random-init: memory does not depend on the weights)
against the tensors of one forward with a cache (`eval.cache_memory`). `seeds` are not
used: nothing here is random but the token ids, which do not change the sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from modformer.experiments.common import write_outputs

NAME = "mom-memory"
GiB = 2**30
PAPER_BATCH, PAPER_SEQ = 10, 1024  # the fitted batch (see the module docstring)
PAPER_TOKENS = PAPER_BATCH * PAPER_SEQ
MOM_PICKS = {"MoM_E": "K3H1S", "MoM_I": "K3H2S", "MoM_P": "K2H6S"}
# MoM paper Table 1, "Memory Cost (Gb)": GPT2, MoM_E, MoM_I, MoM_P per size.
PAPER_MEMORY = {
    "small": (2.98, 2.45, 2.63, 3.34),
    "medium": (4.74, 3.33, 3.80, 5.69),
    "large": (7.20, 4.13, 5.15, 9.24),
}


def paper_rows() -> list[dict]:
    """Per size and model: assembled attention layers, the paper's figure, ours and the
    fitted paper shape (GiB, and the change against that size's GPT-2 row)."""
    from modformer.models.gpt.configuration_gpt import GPTConfig
    from modformer.models.gpt.flops import gpt_cache_memory
    from modformer.models.mom import MoMConfig
    from modformer.models.mom.flops import mom_cache_memory

    rows = []
    for size, paper in PAPER_MEMORY.items():
        gpt = GPTConfig.from_preset(size)
        models = [
            ("GPT2", gpt_cache_memory(gpt, PAPER_BATCH, PAPER_SEQ, torch.float32), gpt.n_layer)
        ]
        for label, name in MOM_PICKS.items():
            config = MoMConfig.from_preset(size, mom=name, vocab_size=gpt.vocab_size)
            memory = mom_cache_memory(config, PAPER_BATCH, PAPER_SEQ, torch.float32)
            models.append((f"{label} {name}", memory, config.num_attention_layers))
        base = {}
        for (label, memory, layers), figure in zip(models, paper):
            fit = PAPER_TOKENS * 4 * (gpt.vocab_size + 3 * layers * gpt.n_embd) / GiB
            row = {"size": size, "model": label, "layers": layers, "paper": figure,
                   "ours": memory.total / GiB, "paper_shape_fit": fit}  # fmt: skip
            base = base or dict(row)
            for key in ("paper", "ours", "paper_shape_fit"):
                row[f"{key}_change"] = row[key] / base[key] - 1
            rows.append(row)
    return rows


def measured_rows(scale: str) -> list[dict]:
    """Our CPU-scale models: the formula against the tensors of a forward with a cache."""
    from dataclasses import asdict

    from modformer.convert.mom import mom_config_from_gpt
    from modformer.eval.cache_memory import cache_memory_rows
    from modformer.experiments.mom_vs_vanilla import CHUNKS, SCALES
    from modformer.models.gpt.configuration_gpt import GPTConfig

    s = SCALES[scale]
    gpt = GPTConfig.from_preset(
        "tiny", vocab_size=4096, n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head,
        n_positions=max(256, s.block_size),
    )  # fmt: skip
    entries = [("vanilla", gpt)] + [
        (f"{label} {name}", mom_config_from_gpt(gpt, CHUNKS, name))
        for label, name in MOM_PICKS.items()
    ]
    rows = cache_memory_rows(entries, s.batch_size, s.block_size)
    return [
        {"model": r.name, **asdict(r.formula), "total": r.formula.total,
         "total_change": r.total_vs_first, "measured_equals_formula": asdict(r.measured) == asdict(r.formula)}
        for r in rows
    ]  # fmt: skip


def run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict:
    paper, ours = paper_rows(), measured_rows(scale)
    if not all(r["measured_equals_formula"] for r in ours):
        raise RuntimeError("the cache-memory formula disagrees with the measured tensors")
    paper_table = [
        "| size | model | attention layers | paper | ours: logits + 2BTd per layer "
        "| logits + 3BTd per layer |",
        "|---|---|---|---|---|---|",
    ] + [
        f"| {r['size']} | {r['model']} | {r['layers']} | {r['paper']:.2f} "
        f"({r['paper_change']:+.1%}) | {r['ours']:.2f} ({r['ours_change']:+.1%}) | "
        f"{r['paper_shape_fit']:.2f} ({r['paper_shape_fit_change']:+.1%}) |"
        for r in paper
    ]
    ours_table = [
        "| model | cache layers | logits | KV cache | key flags | router state | total "
        "| vs vanilla | measured = formula |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ours:
        mib = {k: f"{r[k] / 2**20:.2f}" for k in ("logits", "kv_cache", "key_flags",
                                                  "router_state", "total")}  # fmt: skip
        ours_table.append(
            f"| {r['model']} | {r['cache_layers']} | {mib['logits']} | {mib['kv_cache']} "
            f"| {mib['key_flags']} | {mib['router_state']} | {mib['total']} "
            f"| {r['total_change']:+.1%} | {r['measured_equals_formula']} |"
        )
    parts = [
        f"# {NAME}: memory with a KV cache (MoM Table 1)",
        f"## The paper's figures against the formulas (GiB; batch {PAPER_BATCH} x "
        f"{PAPER_SEQ} tokens, fp32; change against GPT-2 of the same size)",
        "\n".join(paper_table),
        f"## Our {scale}-scale models (MiB; mom-vs-vanilla's batch x tokens): the formula "
        "and the tensors of one forward with a cache",
        "\n".join(ours_table),
    ]
    payload = {"scale": scale, "paper_batch": [PAPER_BATCH, PAPER_SEQ], "paper": paper,
               "ours": ours}  # fmt: skip
    write_outputs(out_dir, NAME, payload, "\n\n".join(parts))
    return payload
