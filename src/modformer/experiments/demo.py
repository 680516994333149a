"""`modformer demo`: the end-to-end run on the built-in corpus.

Stage `vanilla`: prepare the default corpus, train the tiny GPT, report validation
loss/perplexity beside a unigram model of the same corpus, and generate a sample.
Stage `mom`: phase 2 of two-phase training: the vanilla model's layers become MoM module
pools, trained for `mom_steps`; beside it the vanilla model trained the same extra steps.
Stage `moduleformer`: train a tiny ModuleFormer and a dense GPT of equal active compute for
the same steps on the same batches; report validation loss, tokens/s and active/total
parameters.
Stage `report`: training curves of every run, and routing reports (module usage, MoM
step transitions, per-domain expert distributions and their KL) as PNG + JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modformer.config import ConfigError
from modformer.utils import atomic_write_text

STAGES = ("vanilla", "mom", "moduleformer", "report")


@dataclass
class DemoSettings:
    """What the demo trains and where (`modformer demo` shows these defaults)."""

    work_dir: str | Path = "runs/demo"
    stages: Sequence[str] = STAGES
    steps: int = 300  # of the vanilla model
    mom_steps: int = 100  # phase 2: MoM and the vanilla model continued
    mom_config: str = "K2H3S"
    mom_chunks: str = "[1-2-1]"  # over the tiny model's 4 layers
    moduleformer_steps: int = 150
    batch_size: int = 8
    block_size: int = 128
    vocab_size: int = 4096
    max_bytes_per_domain: int = 1_500_000
    seed: int = 1337
    progress: bool = True


def _prepare_data(settings: DemoSettings, data_dir: Path) -> dict[str, Any]:
    from modformer.data.prepare import prepare

    if (data_dir / "meta.json").is_file():
        return json.loads((data_dir / "meta.json").read_text())
    print(f"== preparing the built-in corpus into {data_dir}")
    return prepare(
        data_dir,
        vocab_size=settings.vocab_size,
        max_bytes_per_domain=settings.max_bytes_per_domain,
        seed=settings.seed,
        progress=settings.progress,
    )


def _train_cfg(settings: DemoSettings, data_dir: Path, out_dir: Path, steps: int, **model: Any):
    from modformer.train.config import load_train_config

    cfg = load_train_config(
        cli={
            "model": model,
            "data": {"dir": str(data_dir), "block_size": settings.block_size},
            "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": max(steps // 20, 1)},
            "out_dir": str(out_dir),
            "seed": settings.seed,
            "max_steps": steps,
            "batch_size": settings.batch_size,
            "eval_interval": max(steps // 5, 1),
            "eval_batches": 16,
            "log_interval": 20,
            "ckpt_interval": 0,
            "keep_last": 1,
            "progress": settings.progress,
        }
    )
    return cfg


def _fresh_run(out_dir: Path) -> None:
    """Demo runs always start over, so re-running the demo never resumes stale state."""
    import shutil

    if out_dir.exists():
        shutil.rmtree(out_dir)


def stage_vanilla(settings: DemoSettings, data_dir: Path, work: Path) -> dict[str, Any]:
    from modformer.data.dataset import TokenDataset
    from modformer.eval.lm import unigram_loss
    from modformer.generation import greedy_sample_checked
    from modformer.models.loading import load_model, load_tokenizer
    from modformer.train.trainer import train

    out_dir = work / "vanilla"
    _fresh_run(out_dir)
    print(f"== training the tiny vanilla GPT for {settings.steps} steps")
    t0 = time.perf_counter()
    final = train(
        _train_cfg(settings, data_dir, out_dir, settings.steps, arch="gpt", preset="tiny")
    )
    seconds = time.perf_counter() - t0
    tr, va = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    unigram = unigram_loss(tr.tokens, va.tokens, tr.vocab_size)
    model = load_model(out_dir)
    tokenizer = load_tokenizer(out_dir)
    prompt = "def "
    # Greedy, and checked against full forwards: the demo fails loudly if cached decoding
    # breaks (as it did silently under transformers 5.24 before the models took `cache`).
    sample = greedy_sample_checked(model, tokenizer, prompt, max_new_tokens=60)
    return {
        "val_loss": final["val_loss"],
        "val_ppl": final["val_ppl"],
        "unigram_loss": unigram,
        "params": final["params"],
        "train_seconds": seconds,
        "sample_prompt": prompt,
        "sample": sample,
    }


def count_parameters(model) -> tuple[int, int]:
    """(active, total): parameters one token touches, and all of them."""
    total = model.num_parameters()
    active = model.active_parameters() if hasattr(model, "active_parameters") else total
    return active, total


def _flops_per_token(model, data_dir: Path, block_size: int) -> float:
    """Inference FLOPs per token on a few validation windows, counting only the modules
    each token actually ran (routing-dependent for MoM and ModuleFormer)."""
    from modformer.data.dataset import TokenDataset
    from modformer.eval.costs import flops_per_token

    batch = next(TokenDataset(data_dir, "val").iter_sequential(block_size, 4))
    return flops_per_token(model, batch)


def _train_and_measure(
    settings: DemoSettings, data_dir: Path, out_dir: Path, steps: int, **model: Any
) -> dict[str, Any]:
    from modformer.models.loading import load_model
    from modformer.train.trainer import train

    _fresh_run(out_dir)
    t0 = time.perf_counter()
    final = train(_train_cfg(settings, data_dir, out_dir, steps, **model))
    seconds = time.perf_counter() - t0
    model = load_model(out_dir)
    active, total = count_parameters(model)
    return {
        "flops_per_token": _flops_per_token(model, data_dir, settings.block_size),
        "val_loss": final["val_loss"],
        "val_ppl": final["val_ppl"],
        "tokens_per_s": final["tokens_trained"] / seconds,
        "active_params": active,
        "total_params": total,
        "steps": steps,
    }


def stage_mom(settings: DemoSettings, data_dir: Path, work: Path) -> dict[str, Any]:
    from modformer.convert.mom import mom_from_vanilla
    from modformer.models.io import atomic_save_model

    vanilla = work / "vanilla" / "model"
    if not (vanilla / "config.json").is_file():
        raise ConfigError(
            f"the mom stage starts from the vanilla stage's model, but {vanilla} does not exist; run --stages vanilla,mom"
        )
    steps = settings.mom_steps
    init = work / "mom_init"
    model = mom_from_vanilla(vanilla, chunks=settings.mom_chunks, mom_name=settings.mom_config)
    atomic_save_model(model, init, tokenizer_dir=vanilla)
    print(
        f"== phase 2: MoM {settings.mom_config} {settings.mom_chunks} from the vanilla model, {steps} steps; vanilla continued for the same steps"
    )
    return {
        f"MoM {settings.mom_config}": _train_and_measure(
            settings, data_dir, work / "mom", steps, init_from=str(init)
        ),
        "vanilla (cont.)": _train_and_measure(
            settings, data_dir, work / "vanilla_cont", steps, init_from=str(vanilla)
        ),
    }


def stage_moduleformer(settings: DemoSettings, data_dir: Path, work: Path) -> dict[str, Any]:
    steps = settings.moduleformer_steps
    print(f"== ModuleFormer (tiny) vs dense GPT of equal active compute, {steps} steps each")
    return {
        "moduleformer": _train_and_measure(
            settings, data_dir, work / "moduleformer", steps, arch="moduleformer", preset="tiny"
        ),
        "dense": _train_and_measure(
            settings, data_dir, work / "dense", steps, arch="gpt", preset="tiny"
        ),
    }


def stage_report(settings: DemoSettings, data_dir: Path, work: Path) -> dict[str, Any]:
    from modformer.analysis.routing_report import write_routing_report
    from modformer.analysis.usage import collect_usage_on_data
    from modformer.eval.curves import plot_training_curves, run_length
    from modformer.models.loading import load_model

    out = work / "report"
    runs = [work / name for name in RUN_NAMES if (work / name / "metrics.jsonl").is_file()]
    if not runs:
        raise ConfigError(f"no training runs in {work} to report on; run the other stages first")
    # Phase-2 runs (MoM, vanilla continued) start where the vanilla run ended.
    phase1_tokens = run_length(work / "vanilla") if (work / "vanilla") in runs else 0.0
    offsets = [phase1_tokens if run.name in PHASE2_RUNS else 0.0 for run in runs]
    curves = plot_training_curves(
        runs, out / "training_curves.png", x_axis="tokens", smoothing=0.6, x_offsets=offsets
    )
    figures = [str(curves)]
    for name in ("mom", "moduleformer"):
        if (work / name / "model" / "config.json").is_file():
            model = load_model(work / name)
            stats = collect_usage_on_data(
                model, data_dir, block_size=settings.block_size, max_batches=8, per_domain=True
            )
            report = write_routing_report(stats, out / name)
            figures += [str(out / name / f) for f in report["figures"]]
    return {"figures": figures}


# Runs the demo trains, in the order the curves legend lists them.
RUN_NAMES = ("vanilla", "vanilla_cont", "mom", "dense", "moduleformer")
# Runs initialised from the vanilla run's final model.
PHASE2_RUNS = ("vanilla_cont", "mom")


def print_table(
    title: str, rows: dict[str, dict[str, Any]], columns: list[tuple[str, str, str]]
) -> None:
    """A plain aligned table: columns are (key, header, format)."""
    print(f"\n== {title}")
    widths = [max(len(h), 12) for _, h, _ in columns]
    print(f"   {'model':<14}" + "".join(f"{h:>{w + 2}}" for (_, h, _), w in zip(columns, widths)))
    for name, r in rows.items():
        cells = "".join(f"{format(r[k], f):>{w + 2}}" for (k, _, f), w in zip(columns, widths))
        print(f"   {name:<14}{cells}")


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run the stages in `settings.stages` (in the demo's order) in `settings.work_dir`;
    returns what results.json holds afterwards (earlier stages' results are kept)."""
    if isinstance(settings.stages, str):
        raise ConfigError(
            f"stages must be a list of stage names such as {list(STAGES[:2])}, "
            f"got the string {settings.stages!r}"
        )
    stages = [s.strip() for s in settings.stages if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if settings.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {settings.steps}")
    work = Path(settings.work_dir)
    earlier = read_results(work / "results.json")  # read first: a bad file fails fast
    data_dir = work / "data"
    meta = _prepare_data(settings, data_dir)
    print(
        f"   corpus: {', '.join(meta['domains'])}; {meta['splits']['train']['tokens']:,} train / "
        f"{meta['splits']['val']['tokens']:,} val tokens, vocab {meta['vocab_size']}"
    )
    results: dict[str, Any] = {}
    if "vanilla" in stages:
        r = results["vanilla"] = stage_vanilla(settings, data_dir, work)
        print("\n== vanilla GPT (tiny)")
        print(f"   parameters          {r['params']:,}")
        print(
            f"   validation loss     {r['val_loss']:.3f} nats/token (perplexity {r['val_ppl']:.1f})"
        )
        print(
            f"   unigram baseline    {r['unigram_loss']:.3f} nats/token (perplexity {2.718281828 ** r['unigram_loss']:.1f})"
        )
        print(f"   training time       {r['train_seconds']:.0f} s")
        print(f"   sample: {r['sample_prompt']}{r['sample']!r}")
    if "mom" in stages:
        rows = results["mom"] = stage_mom(settings, data_dir, work)
        print_table(
            "phase 2: MoM vs vanilla trained the same extra steps",
            rows,
            [
                ("val_loss", "val loss", ".3f"),
                ("total_params", "params", ","),
                ("flops_per_token", "FLOPs/token", ",.0f"),
                ("tokens_per_s", "tokens/s", ",.0f"),
            ],
        )
    if "moduleformer" in stages:
        rows = results["moduleformer"] = stage_moduleformer(settings, data_dir, work)
        print_table(
            "ModuleFormer vs dense (same steps, same batches)",
            rows,
            [
                ("val_loss", "val loss", ".3f"),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("flops_per_token", "FLOPs/token", ",.0f"),
                ("active_params", "active params", ","),
                ("total_params", "total params", ","),
            ],
        )
    if "report" in stages:
        rep = results["report"] = stage_report(settings, data_dir, work)
        print("\n== figures")
        for f in rep["figures"]:
            print(f"   {f}")
    # Stages run now replace their earlier entries; the other stages' results are kept.
    results = {**earlier, **results}
    atomic_write_text(work / "results.json", json.dumps(results, indent=2))
    print(f"\nresults written to {work / 'results.json'}")
    return results


def read_results(path: Path) -> dict[str, Any]:
    """The results.json of earlier demo runs ({} when there is none)."""
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        results = e
    if not isinstance(results, dict):
        raise ConfigError(
            f"{path} is not a demo results file ({results}); move it away or delete it, "
            "since the demo merges this run's stages into it"
        )
    return results
