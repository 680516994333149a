"""MoM vs vanilla (MoM paper Table 1, small, at CPU scale): `modformer reproduce mom-vs-vanilla`.

Per seed, a phase-1 vanilla GPT (6 layers, d = 128) is trained; phase 2 starts from it:

- ``mom_e`` / ``mom_i`` / ``mom_p``: MoM K3H1S / K3H2S / K2H6S, chunks ``[1-4-1]``, router
  width ``convert.mom``'s default max(8, d / 4), for the phase-2 steps;
- ``vanilla_cont`` (the baseline): the vanilla model continued for the same steps with the
  same schedule and batches: equal tokens, parameters within 2% (MoM adds its routers);
- ``vanilla_flops_X``: the vanilla model continued for as many steps as make its training
  FLOPs equal to MoM arm X's (steps = phase-2 steps x FLOPs/token of X / FLOPs/token of
  vanilla, both measured on validation windows after training; training FLOPs are about
  3x the forward FLOPs for both, so the ratio carries over). For the cheaper MoM_E this
  gives vanilla *fewer* steps: equal FLOPs, not equal tokens;
- ``param_sharing``: the policy ``parameter_sharing`` on the same chunks: H steps through the
  chunk's 4 modules in depth order, each module run H / 4 times in a row, no router: equal
  parameters to vanilla and FLOPs close to MoM_P's (H chosen as the nearest to MoM_P's
  measured FLOPs per token, see `PARAM_SHARING_H`), the "deeper graph from the same
  weights, without routing" control for MoM_P.

Every arm continues the phase-1 model of its seed with the same recipe (learning rate,
warm-up, batch order from the seed), so the comparison is paired by seed.

The phase-1 models and the MoM_P arm are shared with `mom_two_phase` (stored under
``OUT/../mom-shared-SCALE``) so neither experiment trains them twice.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modformer.experiments.common import (
    ArmResult,
    builtin_data,
    compare,
    results_table,
    run_arm,
    write_outputs,
)

NAME = "mom-vs-vanilla"
DATA_ENV = "MODFORMER_REPRODUCE_DATA"  # a prepared data dir to use instead of the built-in one


@dataclass(frozen=True)
class Scale:
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    batch_size: int
    phase1_steps: int
    phase2_steps: int
    lr: float = 2e-3
    min_lr: float = 2e-4
    eval_batch_size: int = 32
    # Fraction of each domain's validation tokens evaluated (their first windows, in
    # order): the whole split (1.0, what results are reported on) costs ~18 s per arm on
    # one idle core; a fraction is only for plumbing checks.
    val_fraction: float = 1.0
    # Only the arms the headline claims need (vanilla continued, MoM_P, vanilla at MoM_P's
    # FLOPs; in mom-two-phase vanilla for all steps, MoM_P from scratch, two-phase), for
    # the longer scale where every arm costs 3x as much.
    core_only: bool = False


SCALES = {
    # 2:1 phase-1 : phase-2, as the paper's 20k + 10k steps.
    "full": Scale(
        n_layer=6, n_embd=128, n_head=4, block_size=128, batch_size=8,
        phase1_steps=160, phase2_steps=80,
    ),
    # The training-length lever: 3x both phases (480 + 240 steps of 1024 tokens, about
    # 0.75 of an epoch of the built-in corpus), the headline arms only.
    "long": Scale(
        n_layer=6, n_embd=128, n_head=4, block_size=128, batch_size=8,
        phase1_steps=480, phase2_steps=240, core_only=True,
    ),
    "quick": Scale(
        n_layer=6, n_embd=32, n_head=2, block_size=32, batch_size=2,
        phase1_steps=6, phase2_steps=4,
    ),
}  # fmt: skip
CHUNKS = "[1-4-1]"
MOM_ARMS = {"mom_e": "K3H1S", "mom_i": "K3H2S", "mom_p": "K2H6S"}
# 2 fixed blocks + 9 shared-module steps: the nearest to MoM_P K2H6S's measured FLOPs
# per token at d = 128 (see docs/results.md); step h runs module h * 4 // 9.
PARAM_SHARING_H = 9


def share_map(num_modules: int, steps: int) -> list[int]:
    """Step h runs module h * N // H: depth order, each module repeated in a row."""
    return [h * num_modules // steps for h in range(steps)]


def data_dir(out_dir: Path) -> Path:
    """$MODFORMER_REPRODUCE_DATA if set, else the built-in corpus prepared once into
    runs/reproduce/data (shared by all reproduction experiments)."""
    given = os.environ.get(DATA_ENV)
    if given:
        path = Path(given)
        if not (path / "meta.json").is_file():
            raise ValueError(
                f"{DATA_ENV}={given} is not a prepared data directory (no meta.json); "
                "run `modformer prepare` into it or unset the variable"
            )
        return path
    return builtin_data(Path("runs") / "reproduce" / "data")


def shared_dir(out_dir: Path, scale: str) -> Path:
    """Where the phase-1 models and arms shared by the MoM experiments live."""
    return out_dir.parent / f"mom-shared-{scale}"


def train_cfg(
    s: Scale, data: Path, run_dir: Path, steps: int, seed: int, lr: float | None = None,
    warmup_steps: int | None = None, log_interval: int | None = None, **model: Any
):  # fmt: skip
    """The demo's recipe (`modformer.experiments.demo._train_cfg`) on one thread, evaluating
    only at the end; metrics every `log_interval` steps (default: 4 lines per run)."""
    from modformer.train.config import load_train_config

    peak = s.lr if lr is None else lr
    return load_train_config(
        cli={
            "model": model,
            "data": {"dir": str(data), "block_size": s.block_size},
            "optim": {
                "lr": peak,
                "min_lr": min(s.min_lr, peak),
                "warmup_steps": max(steps // 20, 1) if warmup_steps is None else warmup_steps,
            },
            "out_dir": str(run_dir),
            "seed": seed,
            "max_steps": steps,
            "batch_size": s.batch_size,
            "eval_interval": 0,
            "eval_batches": 2,
            "log_interval": max(steps // 4, 1) if log_interval is None else log_interval,
            "ckpt_interval": 0,
            "keep_last": 1,
            "progress": False,
            "threads": 1,
        }
    )


def measure_domains(model_dir: Path, data: Path, s: Scale) -> dict[str, Any]:
    """`common.measure`, but each validation window lies in one domain and the split loss
    is the token-weighted mean of the per-domain losses (one pass instead of two), over
    the first `s.val_fraction` of each domain's validation tokens."""
    import math

    from modformer.data.dataset import TokenDataset
    from modformer.eval.costs import inference_flops
    from modformer.models.loading import load_model
    from modformer.train.evaluate import evaluate_batches

    model = load_model(model_dir).eval()
    val = TokenDataset(data, "val")
    per_domain, tokens = {}, {}
    window = s.block_size * s.eval_batch_size
    for name, (first, end) in val.domain_ranges.items():
        batches = max(1, math.ceil((end - first) * s.val_fraction / window))
        iterator = val.iter_sequential(s.block_size, s.eval_batch_size, domain=name)
        result = evaluate_batches(model, (b for _, b in zip(range(batches), iterator)))
        per_domain[name], tokens[name] = result["loss"], result["tokens"]
    total = sum(tokens.values())
    flops = inference_flops(model, next(val.iter_sequential(s.block_size, 4)))
    return {
        "val_loss": sum(per_domain[d] * tokens[d] for d in per_domain) / total,
        "val_tokens": total,
        "val_loss_per_domain": per_domain,
        "total_params": model.num_parameters(),
        "active_params": flops.active_parameters,
        "flops_per_token": flops.per_token,
    }


def train_and_measure(
    arm: str, seed: int, s: Scale, data: Path, run_dir: Path, steps: int, extra=None, **kw: Any
) -> ArmResult:
    """Train one arm from scratch into `run_dir` (a half-finished run there is discarded),
    then measure it on the whole validation split. The final model stays in run_dir/model."""
    from modformer.train.trainer import train

    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    train(train_cfg(s, data, run_dir, steps, seed, **kw))
    seconds = time.perf_counter() - start
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the model/ is what we keep
    m = measure_domains(run_dir / "model", data, s)
    return ArmResult(
        arm=arm,
        seed=seed,
        val_loss=m["val_loss"],
        total_params=m["total_params"],
        active_params=m["active_params"],
        flops_per_token=m["flops_per_token"],
        train_tokens=steps * s.batch_size * s.block_size,
        steps=steps,
        wall_seconds=seconds,
        extra={
            "val_loss_per_domain": m["val_loss_per_domain"],
            "val_tokens": m["val_tokens"],
            **(extra or {}),
        },
    )


def measured_result(arm: str, seed: int, s: Scale, data: Path, model_dir: Path, steps: int):
    m = measure_domains(model_dir, data, s)
    return ArmResult(
        arm, seed, m["val_loss"], m["total_params"], m["active_params"], m["flops_per_token"],
        steps * s.batch_size * s.block_size, steps, 0.0,
        {"val_loss_per_domain": m["val_loss_per_domain"], "val_tokens": m["val_tokens"]},
    )  # fmt: skip


def locked_arm(root: Path, arm: str, seed: int, fn) -> ArmResult:
    """`run_arm` under a file lock, so several processes can run the MoM experiments at
    once (both experiments, or one experiment with its seeds in another order): a process
    waits for, then reuses, an arm another one is training."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".lock_{arm}_{seed}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return run_arm(root, arm, seed, fn)


def phase1(out_dir: Path, scale: str, seed: int) -> Path:
    """The seed's phase-1 vanilla model (trained once, shared by the MoM experiments)."""
    s, data = SCALES[scale], data_dir(out_dir)
    root = shared_dir(out_dir, scale)
    run_dir = root / "runs" / "phase1" / f"seed_{seed}"

    def fn(run: Path) -> ArmResult:
        return train_and_measure(
            "vanilla_phase1", seed, s, data, run, s.phase1_steps, arch="gpt", preset="tiny",
            overrides={"n_layer": s.n_layer, "n_embd": s.n_embd, "n_head": s.n_head,
                       "n_positions": max(256, s.block_size)},
        )  # fmt: skip

    locked_arm(root, "phase1", seed, fn)
    return run_dir / "model"


def mom_init(phase1_model: Path, init_dir: Path, mom_name: str | None, **overrides: Any) -> Path:
    """Phase-2 initialisation (`convert.mom.mom_from_vanilla`) saved to `init_dir`."""
    from modformer.convert.mom import mom_from_vanilla
    from modformer.train.checkpoint import atomic_save_model

    if not (init_dir / "config.json").is_file():
        model = mom_from_vanilla(phase1_model, chunks=CHUNKS, mom_name=mom_name, **overrides)
        atomic_save_model(model, init_dir, tokenizer_dir=phase1_model)
    return init_dir


def phase2_arm(
    root: Path, arm: str, seed: int, scale: str, phase1_model: Path, steps: int | None = None,
    mom_name: str | None = None, extra=None, lr: float | None = None,
    warmup_steps: int | None = None, **overrides: Any
) -> ArmResult:  # fmt: skip
    """Phase 2 from the seed's phase-1 model: a MoM (mom_name or overrides given) or the
    vanilla model itself, trained `steps` (default: the scale's phase-2 steps)."""
    s = SCALES[scale]
    data = data_dir(root)
    steps = s.phase2_steps if steps is None else steps

    def fn(run: Path) -> ArmResult:
        init = phase1_model
        if mom_name is not None or overrides:
            init = mom_init(phase1_model, run.parent / f"{run.name}_init", mom_name, **overrides)
        return train_and_measure(
            arm, seed, s, data, run, steps, extra=extra, lr=lr, warmup_steps=warmup_steps,
            init_from=str(init),
        )  # fmt: skip

    return locked_arm(root, arm, seed, fn)


def mom_p_arm(out_dir: Path, scale: str, seed: int, phase1_model: Path) -> ArmResult:
    """Two-phase MoM_P K2H6S (shared with mom_two_phase)."""
    return phase2_arm(
        shared_dir(out_dir, scale), "mom_p", seed, scale, phase1_model,
        mom_name=MOM_ARMS["mom_p"],
    )  # fmt: skip


ARM_ORDER = [
    "vanilla_cont", "mom_e", "mom_i", "mom_p", "vanilla_flops_mom_e", "vanilla_flops_mom_i",
    "vanilla_flops_mom_p", "param_sharing", "mom_p_lr_half", "vanilla_cont_long", "mom_p_long",
]  # fmt: skip
MATCHED = {
    "vanilla_cont": "baseline: vanilla continued, same steps and batches",
    "mom_e": "equal tokens, params +~2% (routers)",
    "mom_i": "equal tokens, params +~2% (routers)",
    "mom_p": "equal tokens, params +~2% (routers)",
    "vanilla_flops_mom_e": "equal training FLOPs to mom_e (fewer steps), equal params",
    "vanilla_flops_mom_i": "equal training FLOPs to mom_i (more steps), equal params",
    "vanilla_flops_mom_p": "equal training FLOPs to mom_p (more steps), equal params",
    "param_sharing": "equal params to vanilla, FLOPs ~ mom_p's, equal tokens",
    "mom_p_lr_half": "lever: mom_p with phase-2 peak lr halved; equal tokens",
    "vanilla_cont_long": "lever's baseline: vanilla continued for 2x the phase-2 steps",
    "mom_p_long": "lever: mom_p for 2x the phase-2 steps; equal tokens to vanilla_cont_long",
}


# Each MoM arm against its own matched control (paired by seed): title -> (baseline, arms).
EQUAL_COST_TABLES = {
    f"{arm} vs vanilla at equal training FLOPs": (f"vanilla_flops_{arm}", [arm]) for arm in MOM_ARMS
} | {
    "mom_p vs parameter sharing (equal params, similar FLOPs)": ("param_sharing", ["mom_p"]),
    "lever: mom_p with half the phase-2 peak lr vs mom_p": ("mom_p", ["mom_p_lr_half"]),
    "lever: phase 2 twice as long (mom_p vs vanilla continued, both 2x steps)": (
        "vanilla_cont_long",
        ["mom_p_long"],
    ),
}


def run(out_dir: Path, seeds: Sequence[int], scale: str) -> dict:
    s = SCALES[scale]
    start = time.perf_counter()
    results: list[ArmResult] = []
    phase1_models = {}
    done: list[int] = []

    def write() -> dict:  # after every seed, so a stopped run leaves its tables so far
        rows = [run_arm(shared_dir(out_dir, scale), "phase1", seed, None) for seed in done]
        return finish(out_dir, NAME, scale, done, results, rows, "vanilla_cont", ARM_ORDER,
                      MATCHED, start, extra_tables=EQUAL_COST_TABLES)  # fmt: skip

    # Seed by seed the arms the claims need; the lever arm after all seeds have them.
    for seed in seeds:
        p1 = phase1_models[seed] = phase1(out_dir, scale, seed)
        base = phase2_arm(out_dir, "vanilla_cont", seed, scale, p1)
        results.append(base)
        moms = {}
        for arm, name in MOM_ARMS.items():
            if s.core_only and arm != "mom_p":
                continue
            moms[arm] = (
                mom_p_arm(out_dir, scale, seed, p1)
                if arm == "mom_p"
                else phase2_arm(out_dir, arm, seed, scale, p1, mom_name=name)
            )
            results.append(moms[arm])
        for arm, mom in moms.items():
            ratio = mom.flops_per_token / base.flops_per_token
            steps = max(1, round(s.phase2_steps * ratio))
            results.append(
                phase2_arm(
                    out_dir, f"vanilla_flops_{arm}", seed, scale, p1, steps=steps,
                    extra={"flops_ratio": ratio},
                )
            )  # fmt: skip
        if s.core_only:
            done.append(seed)
            write()
            continue
        results.append(
            phase2_arm(
                out_dir, "param_sharing", seed, scale, p1, policy="parameter_sharing",
                H=PARAM_SHARING_H, share_map=share_map(4, PARAM_SHARING_H),
            )
        )  # fmt: skip
        done.append(seed)
        write()
    if s.core_only:
        return write()
    # The levers for a MoM that does not beat its baseline, on one arm: restarting
    # phase 2 at the phase-1 peak learning rate may undo phase 1; halve it.
    for seed in seeds:
        results.append(
            phase2_arm(
                out_dir, "mom_p_lr_half", seed, scale, phase1_models[seed],
                mom_name=MOM_ARMS["mom_p"], lr=s.lr / 2,
            )
        )  # fmt: skip
        write()
    # A second lever: phase 2 twice as long (phase 2 : phase 1 of 1 : 1 instead of 1 : 2).
    for seed in seeds:
        long = 2 * s.phase2_steps
        results.append(phase2_arm(out_dir, "vanilla_cont_long", seed, scale,
                                  phase1_models[seed], steps=long))  # fmt: skip
        results.append(phase2_arm(out_dir, "mom_p_long", seed, scale, phase1_models[seed],
                                  steps=long, mom_name=MOM_ARMS["mom_p"]))  # fmt: skip
        write()
    return write()


def finish(
    out_dir: Path, name: str, scale: str, seeds: Sequence[int], results: list[ArmResult],
    phase1_rows: list[ArmResult], baseline: str, order: list[str], matched: dict[str, str],
    start: float, extra_tables: dict[str, tuple[str, list[str]]] | None = None,
) -> dict:  # fmt: skip
    """results.json + results.md of a MoM experiment: the table against `baseline`, what
    every arm is matched on, further tables (title -> (baseline, arms)), phase-1 losses."""
    s = SCALES[scale]
    seconds = time.perf_counter() - start
    val = ("the whole validation split" if s.val_fraction >= 1
           else f"val: first {s.val_fraction:.0%} of each domain")  # fmt: skip
    present = {r.arm for r in results}
    parts = [
        f"# {name} ({scale}: {s.n_layer} layers, d={s.n_embd}, chunks {CHUNKS}, phase 1 "
        f"{s.phase1_steps} steps, phase 2 {s.phase2_steps} steps, batch {s.batch_size} x "
        f"{s.block_size}, {val})",
        results_table(results, baseline, order),
        "What each arm is matched on:\n"
        + "\n".join(f"- `{a}`: {matched[a]}" for a in order if a in present),
    ]
    comparisons = {f"{a} vs {baseline}": asdict(compare(results, a, baseline)) for a in order
                   if a != baseline and a in present}  # fmt: skip
    for title, (other, arms) in (extra_tables or {}).items():
        arms = [a for a in arms if a in present]
        if other not in present or not arms:
            continue  # not trained yet (a table written before the last seed or arm)
        parts += [f"## {title}", results_table(results, other, [other, *arms])]
        comparisons.update({f"{a} vs {other}": asdict(compare(results, a, other)) for a in arms})
    parts.append(
        "Phase-1 models (before phase 2): "
        + ", ".join(f"seed {r.seed}: {r.val_loss:.4f}" for r in phase1_rows)
    )
    parts.append(f"Wall time of this run: {seconds:.0f} s (arms already stored are not retrained)")
    payload = {
        "scale": scale,
        "settings": asdict(s),
        "seeds": list(seeds),
        "results": [asdict(r) for r in results],
        "phase1": [asdict(r) for r in phase1_rows],
        "comparisons": comparisons,
        "wall_seconds": seconds,
    }
    write_outputs(out_dir, name, payload, "\n\n".join(parts))
    return payload
