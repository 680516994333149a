"""The two pruning workflows of ModuleFormer sec. 5.3, on the domains of a prepared data
directory (the model surgery itself is `modformer.surgery.prune`):

- `prune_then_finetune` ("p-f"): count the pretrained model's expert usage on the target
  domains, prune at a threshold, then fine-tune the smaller model on those domains.
- `finetune_then_prune` ("f-p"): fine-tune on the target domains with the
  load-concentration loss of eq. 8 (``load_concentration_weight``; the paper's is 0.001)
  so the load gathers on few experts, then count usage and prune; one fine-tuning serves
  every threshold. Weight 0 is the paper's "f-p_noaux" ablation (Fig. 4).

`domains` restricts both the fine-tuning data (``data.domains`` of the trainer) and the
windows usage is counted on (each domain's own windows; none crosses a domain boundary);
None means the whole split. `modformer prune-workflow` runs either from the command line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from modformer.analysis.usage import UsageStats, check_same_tokenizer
from modformer.models.moduleformer import ModuleFormerForCausalLM
from modformer.surgery.extend import SurgeryError, load_model_dir, save_model_with_tokenizer
from modformer.surgery.prune import prune_model
from modformer.utils import atomic_write_text

WORKFLOWS = ("finetune-then-prune", "prune-then-finetune")
PAPER_LOAD_CONCENTRATION_WEIGHT = 0.001  # ModuleFormer sec. 5.3


def check_threshold(threshold: Any) -> float:
    """A pruning threshold: a number in [0, 1] (frequencies are max- or sum-normalised)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise SurgeryError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise SurgeryError(
            f"threshold must be in [0, 1] (frequencies are normalised within each layer), "
            f"got {threshold}"
        )
    return float(threshold)


def domain_settings(domains: Sequence[str] | None) -> list[str]:
    """The trainer `--set` strings that restrict training to `domains` (none for all)."""
    return [] if domains is None else [f"data.domains={json.dumps(list(domains))}"]


def train_from(
    init_from: Path,
    data_dir: str | Path,
    out_dir: Path,
    settings: Sequence[str],
    domains: Sequence[str] | None = None,
) -> dict[str, Any]:
    """`modformer train` from the model in `init_from` (its config is kept) on `data_dir`
    (restricted to `domains`); `settings` are further `--set` strings. Final metrics."""
    from modformer.train.config import load_train_config
    from modformer.train.trainer import train

    overrides = [f"model.init_from={init_from}", f"data.dir={data_dir}", f"out_dir={out_dir}"]
    cfg = load_train_config(overrides=[*overrides, *domain_settings(domains), *settings])
    return train(cfg)


def usage_on_domains(
    model: PreTrainedModel | str | Path,
    data_dir: str | Path,
    split: str = "val",
    block_size: int = 128,
    max_batches: int | None = None,
    domains: Sequence[str] | None = None,
    batch_size: int = 8,
) -> UsageStats:
    """Expert usage on `split` of `data_dir`, counted on each of `domains` (all when None;
    at most `max_batches` batches each) and summed."""
    from modformer.analysis.usage import collect_usage, collect_usage_on_data, merge_usage
    from modformer.data.dataset import TokenDataset

    if max_batches is not None and max_batches < 1:
        raise SurgeryError(f"max_batches must be >= 1 or None (all), got {max_batches}")
    if domains is None:
        return collect_usage_on_data(
            model, data_dir, split, block_size, batch_size=batch_size, max_batches=max_batches
        )
    if isinstance(model, (str, Path)):
        check_same_tokenizer(model, data_dir)
        model = load_model_dir(model)
    ds = TokenDataset(data_dir, split, domains=list(domains))  # names unknown domains
    ds.check_vocab_fits(model.config.vocab_size)
    parts = {
        name: collect_usage(
            model, islice(ds.iter_sequential(block_size, batch_size, domain=name), max_batches)
        )
        for name in ds.domains
    }
    overall = merge_usage(parts.values())
    overall.per_domain = parts
    return overall


def save_pruned(
    model: PreTrainedModel, report: Mapping[str, Any], out_dir: str | Path, source_dir
) -> Path:
    """The pruned model (with the source's tokenizer) and its prune_report.json."""
    out = save_model_with_tokenizer(model, out_dir, source_dir, method="prune")
    atomic_write_text(Path(out) / "prune_report.json", json.dumps(report, indent=1))
    return out


def prune_then_finetune(
    model_dir: str | Path,
    data_dir: str | Path,
    threshold: float,
    out_dir: str | Path,
    train_settings: Sequence[str] = (),
    norm: str = "max",
    split: str = "val",
    block_size: int = 128,
    max_batches: int | None = None,
    domains: Sequence[str] | None = None,
    usage: UsageStats | None = None,
) -> dict[str, Any]:
    """Workflow 1 (sec. 5.3, "p-f"): prune by the model's usage on the target domains,
    then fine-tune the pruned model there. `train_settings` are `modformer train --set`
    strings (e.g. "max_steps=200"); `usage` (of this model) skips counting, so one count
    serves several thresholds. Writes out_dir/pruned (the pruned model, prune_report.json)
    and out_dir/finetuned (the training run). Returns {"prune": report, "train": final}.

    The commands are the same two steps::

        modformer prune MODEL --data DATA --threshold TAU OUT/pruned
        modformer train --set model.init_from=OUT/pruned --set data.dir=DATA \\
            --set out_dir=OUT/finetuned --set 'data.domains=[python]' ...
    """
    threshold = check_threshold(threshold)
    out_dir = Path(out_dir)
    check_same_tokenizer(model_dir, data_dir)
    model = load_model_dir(model_dir)
    if usage is None:
        usage = usage_on_domains(model, data_dir, split, block_size, max_batches, domains)
    pruned, report = prune_model(model, usage, threshold, norm)
    save_pruned(pruned, report, out_dir / "pruned", model_dir)
    final = train_from(out_dir / "pruned", data_dir, out_dir / "finetuned", train_settings, domains)
    return {"prune": report, "train": final}


def finetune_then_prune(
    model_dir: str | Path,
    data_dir: str | Path,
    thresholds: Sequence[float],
    out_dir: str | Path,
    load_concentration_weight: float = PAPER_LOAD_CONCENTRATION_WEIGHT,
    train_settings: Sequence[str] = (),
    norm: str = "max",
    split: str = "val",
    block_size: int = 128,
    max_batches: int | None = None,
    domains: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Workflow 2 (sec. 5.3, "f-p"): fine-tune with the load-concentration loss (eq. 8;
    the paper's weight is 0.001, 0 fine-tunes without it), then prune the fine-tuned model
    at every threshold. Writes out_dir/start (the model with the weight in its config),
    out_dir/finetuned (the run), out_dir/usage.json (usage of the fine-tuned model) and
    out_dir/pruned_tau{TAU}. Returns {"train": final metrics, "usage": UsageStats,
    "prune": {tau: report}}.

    As commands: write the weight into the model's config (the trainer keeps a saved
    model's config), fine-tune, then prune::

        modformer train --set model.init_from=START --set data.dir=DATA \\
            --set out_dir=OUT/finetuned ...      # START: config has load_concentration_weight
        modformer prune OUT/finetuned --data DATA --threshold TAU OUT/pruned_tauTAU
    """
    if isinstance(load_concentration_weight, bool) or not load_concentration_weight >= 0:
        raise SurgeryError(
            f"load_concentration_weight must be >= 0, got {load_concentration_weight}"
        )
    thresholds = [check_threshold(t) for t in thresholds]
    if not thresholds:
        raise SurgeryError("give at least one threshold to prune at")
    out_dir = Path(out_dir)
    check_same_tokenizer(model_dir, data_dir)
    model = load_model_dir(model_dir)
    if not isinstance(model, ModuleFormerForCausalLM):
        raise SurgeryError(
            "the load-concentration loss (eq. 8) is a ModuleFormer loss; pass a ModuleFormer"
        )
    model.config.load_concentration_weight = float(load_concentration_weight)
    save_model_with_tokenizer(model, out_dir / "start", model_dir)
    final = train_from(out_dir / "start", data_dir, out_dir / "finetuned", train_settings, domains)
    finetuned = out_dir / "finetuned" / "model"
    model = load_model_dir(finetuned)
    usage = usage_on_domains(model, data_dir, split, block_size, max_batches, domains)
    usage.save(out_dir / "usage.json")
    reports = {}
    for tau in thresholds:
        pruned, report = prune_model(model, usage, tau, norm)
        save_pruned(pruned, report, out_dir / f"pruned_tau{tau:g}", finetuned)
        reports[tau] = report
    return {"train": final, "usage": usage, "prune": reports}
