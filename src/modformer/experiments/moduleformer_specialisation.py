"""Experiment 8 (ModuleFormer Fig. 2): do the FFN experts specialise by domain, MI vs Switch?

The paper: the KL divergence between the FFN-expert distributions of different Pile
domains is larger for MoLM (MI loss) than for its ST-MoE (Switch) baseline: MI gives
"a stronger correlation between the input category and experts".

Models: the ``mi`` and ``switch`` arms of `moduleformer_balance` (trained there, or here
into that experiment's directory ``OUT/../moduleformer-balance`` with the same recipe,
so both experiments share them), and per seed an ``untrained`` tiny ModuleFormer (the
same config at its initialisation): the KL a router shows before learning anything.

Per model, on the whole validation split of each domain: the windows are split into two
halves (even and odd batches); ``between`` is the mean symmetric KL (nats, smoothed as in
`modformer.analysis.routing_report`) between half A of one domain and half B of another,
over ordered domain pairs; ``noise floor`` is the mean KL between the two halves of the
SAME domain (equal token counts, so the two are comparable); both are means over the
FFN routers of all layers. Specialisation shows as ``between`` well above the floor.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from modformer.experiments.common import sibling_experiment_dir, write_outputs
from modformer.experiments.moduleformer_balance import ARMS as BALANCE_ARMS
from modformer.experiments.moduleformer_balance import NAME as BALANCE_NAME
from modformer.experiments.moduleformer_balance import _after as balance_after
from modformer.experiments.moduleformer_vs_dense import data_dir, scale_of, train_arm

NAME = "moduleformer-specialisation"
TRAINED_ARMS = ("mi", "switch")
KIND = "ffn"  # the paper's Fig. 2 is over the MLP (FFN) experts (models.routed.FFN)


def _half_counts(model, data: Path, block_size: int, batch_size: int) -> dict[str, list]:
    """Per domain, the usage counts of its even and of its odd validation batches."""
    from modformer.analysis.usage import collect_usage
    from modformer.data.dataset import TokenDataset

    ds = TokenDataset(data, "val")
    halves = {}
    for domain in ds.domains:
        pair = []
        for start in (0, 1):
            batches = islice(
                ds.iter_sequential(block_size, batch_size, domain=domain), start, None, 2
            )
            pair.append(collect_usage(model, batches).counts)
        halves[domain] = pair
    return halves


def divergences(halves: dict[str, list], kind: str = KIND) -> dict[str, float]:
    """``between`` (half A of one domain vs half B of another) and ``noise_floor`` (the
    two halves of one domain), mean symmetric KL over the routers of `kind` and the
    domain pairs."""
    from modformer.analysis.routing_report import smoothed_distribution, symmetric_kl

    domains = list(halves)
    if len(domains) < 2:
        raise ValueError(
            f"per-domain KL needs at least two domains in the data, got {domains}; prepare "
            "data with several domains (the built-in corpus has python, prose and c)"
        )
    keys = [k for k in halves[domains[0]][0] if k.endswith("/" + kind)]

    def kl(a, b, key) -> float:
        p = smoothed_distribution(a[key].numpy())
        q = smoothed_distribution(b[key].numpy())
        return symmetric_kl(p, q)

    between = [
        kl(halves[i][0], halves[j][1], key)
        for key in keys
        for i in domains
        for j in domains
        if i != j
    ]
    floor = [kl(halves[d][0], halves[d][1], key) for key in keys for d in domains]
    return {"between": statistics.fmean(between), "noise_floor": statistics.fmean(floor)}


def _untrained_like(model, seed: int):
    import torch

    torch.manual_seed(seed)
    return type(model)(model.config).eval()


def run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict:
    from modformer.models.loading import load_model

    sc = scale_of(scale)
    data = data_dir()
    balance_dir = sibling_experiment_dir(out_dir, BALANCE_NAME, scale)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        for arm in TRAINED_ARMS:
            model_cfg = BALANCE_ARMS[arm][1]
            after = balance_after(sc.block_size, data, arm)
            result = train_arm(balance_dir, arm, seed, data, sc, model_cfg, after=after)
            model = load_model(balance_dir / "runs" / arm / f"seed_{seed}")
            d = divergences(_half_counts(model, data, sc.block_size, 8))
            rows.append({"arm": arm, "seed": seed, "val_loss": result.val_loss, **d})
        d = divergences(_half_counts(_untrained_like(model, seed), data, sc.block_size, 8))
        rows.append({"arm": "untrained", "seed": seed, "val_loss": float("nan"), **d})
    wall = time.perf_counter() - start

    def summary(arm: str, key: str) -> tuple[float, float]:
        values = [r[key] for r in rows if r["arm"] == arm]
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return statistics.fmean(values), sd

    lines = [
        f"# {NAME} (scale {scale}, seeds {list(seeds)}; models of {BALANCE_NAME})",
        "",
        "Symmetric KL (nats) between FFN-expert distributions, mean over layers; between: "
        "half A of one domain vs half B of another; noise floor: the two halves of one "
        "domain (equal token counts). Mean +- sd over seeds.",
        "",
        "| model | between domains | noise floor (split half) | between / floor |",
        "|---|---|---|---|",
    ]
    for arm in (*TRAINED_ARMS, "untrained"):
        b, bsd = summary(arm, "between")
        f, fsd = summary(arm, "noise_floor")
        ratio = statistics.fmean(r["between"] / r["noise_floor"] for r in rows if r["arm"] == arm)
        lines.append(f"| {arm} | {b:.4f} +- {bsd:.4f} | {f:.4f} +- {fsd:.4f} | {ratio:.1f} |")
    paired = [
        r["between"] - s["between"]
        for r in rows
        if r["arm"] == "mi"
        for s in rows
        if s["arm"] == "switch" and s["seed"] == r["seed"]
    ]
    if len(paired) > 1:
        se = statistics.stdev(paired) / len(paired) ** 0.5
        mean = statistics.fmean(paired)
        verdict = "within noise" if abs(mean) < 2 * se else ("higher" if mean > 0 else "lower")
        lines += [
            "",
            f"MI - Switch, between-domain KL, paired by seed: {mean:+.4f} +- {se:.4f} "
            f"(SE): {verdict}.",
        ]
    lines += ["", f"Wall time of this invocation: {wall:.0f} s (stored arms are not retrained)."]
    payload = {"scale": scale, "seeds": list(seeds), "rows": rows, "wall_seconds": wall}
    write_outputs(out_dir, NAME, payload, "\n".join(lines))
    return payload
