"""Experiment drivers, the code that trains models to measure something: the reproduction
experiments, one module per claim of the papers, run by `modformer reproduce NAME` (see
docs/results.md for what each measured); the end-to-end demo (`demo`, `modformer demo`)
and hyper-parameter sweeps (`sweep`, `modformer sweep`).

This file only names the reproduction experiments (it imports nothing heavy, so
`modformer --help` stays fast); each of their modules exposes ``run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict``,
trains its arms through `modformer.experiments.common.run_arm` (resumable) and writes
``results.json`` and ``results.md`` in ``out_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Experiment:
    module: str
    summary: str


EXPERIMENTS: dict[str, Experiment] = {}

# ModuleFormer paper (docs/results.md, "## ModuleFormer").
EXPERIMENTS["moduleformer-vs-dense"] = Experiment(
    "modformer.experiments.moduleformer_vs_dense",
    "ModuleFormer vs dense GPTs of equal active compute and equal total parameters and a "
    "dense ModuleFormer; inference latency/throughput ratios (Tables 2-3)",
)
EXPERIMENTS["moduleformer-balance"] = Experiment(
    "modformer.experiments.moduleformer_balance",
    "MI vs Switch vs no balance loss (usage entropy, dead experts) and stick-breaking vs "
    "softmax+RoPE with length extrapolation at 2x (Table 4)",
)
EXPERIMENTS["moduleformer-specialisation"] = Experiment(
    "modformer.experiments.moduleformer_specialisation",
    "per-domain FFN-expert KL of the MI and Switch models of moduleformer-balance against a "
    "split-half noise floor and an untrained model (Fig. 2)",
)
EXPERIMENTS["moduleformer-forgetting"] = Experiment(
    "modformer.experiments.moduleformer_forgetting",
    "forgetting and learning of full fine-tuning, expert insertion (reg 0 and 1) and a dense "
    "GPT on a new domain, and insertion vs the full fine-tuning trajectory at equal learning "
    "(Tables 5-6)",
)
EXPERIMENTS["moduleformer-pruning"] = Experiment(
    "modformer.experiments.moduleformer_pruning",
    "pruning curves on the python domain: finetune-then-prune (with and without load "
    "concentration) and prune-then-finetune against layer dropping at equal parameters "
    "(Figs. 3-4)",
)

# Mixture-of-Modules paper (docs/results.md, "## Mixture-of-Modules").
EXPERIMENTS["mom-vs-vanilla"] = Experiment(
    "modformer.experiments.mom_vs_vanilla",
    "MoM_E/I/P vs vanilla continued, vanilla at equal FLOPs, parameter sharing (MoM Table 1)",
)
EXPERIMENTS["mom-two-phase"] = Experiment(
    "modformer.experiments.mom_two_phase",
    "two-phase MoM vs MoM from scratch, MoM-same, vanilla for all steps (MoM Table 2)",
)
EXPERIMENTS["mom-routing"] = Experiment(
    "modformer.experiments.mom_routing",
    "depth-order diagonal mass, SKIP and all-SKIP rates of mom-vs-vanilla's MoMs (Fig. 6)",
)
EXPERIMENTS["mom-redundancy"] = Experiment(
    "modformer.experiments.mom_redundancy",
    "pools with fewer attention or FFN modules (K = pool size) against the full pool (Fig. 3)",
)
EXPERIMENTS["mom-memory"] = Experiment(
    "modformer.experiments.mom_memory",
    "memory with a KV cache (logits + per-layer cache) against the paper's 12 figures "
    "(Table 1); trains nothing",
)
EXPERIMENTS["mom-kxh"] = Experiment(
    "modformer.experiments.mom_kxh",
    "K x H grid against vanilla continued (Fig. 4); GRU vs MLP router in two-phase training "
    "with gradient-spike counts (App. D.1)",
)

# quick: a few steps per arm, to check the plumbing; long: the MoM experiments' training-
# length lever (3x both phases, headline arms only; other experiments refuse it).
SCALES = ("full", "long", "quick")
