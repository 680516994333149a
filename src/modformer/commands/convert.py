"""`modformer convert KIND`: import checkpoints (gpt2, IBM ModuleFormer, JetMoE, official
MoM) and turn a vanilla model into a Mixture-of-Modules model."""

from __future__ import annotations

import argparse
from pathlib import Path

from modformer.config import ConfigError


def run_convert(args: argparse.Namespace) -> None:
    """Run the conversion `args.convert_kind` names."""
    RUNS[args.convert_kind](args)


def check_model_destination(dst: str, overwrite: bool) -> None:
    """Before any work: `dst` can be written, and an existing model there is replaced only
    with --overwrite (and a non-model directory never)."""
    from modformer.utils import check_output_path

    path = check_output_path(dst, "output directory", directory=True)
    if path.is_dir() and any(path.iterdir()):
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"output directory {dst} is not empty and holds no model; choose another one"
            )
        if not overwrite:
            raise ConfigError(f"{dst} already holds a model; pass --overwrite to replace it")


def run_convert_gpt2(args: argparse.Namespace) -> None:
    from modformer.convert.gpt2 import convert_gpt2

    model = convert_gpt2(args.src, args.dst)
    n = model.num_parameters()
    print(f"converted {args.src} -> {args.dst} ({n:,} parameters)")


def run_convert_moduleformer(args: argparse.Namespace) -> None:
    from modformer.convert.moduleformer import convert_moduleformer

    model = convert_moduleformer(
        args.src, args.dst, args.drop_training_options, args.history_length
    )
    print(
        f"converted {args.src} -> {args.dst} ({model.total_parameters():,} parameters, "
        f"{model.active_parameters():,} active per token)"
    )


def run_convert_jetmoe(args: argparse.Namespace) -> None:
    from modformer.convert.jetmoe import convert_jetmoe

    model = convert_jetmoe(args.src, args.dst)
    n = model.num_parameters()
    print(f"converted {args.src} -> {args.dst} (JetMoE as ModuleFormer, {n:,} parameters)")


def run_convert_mom(args: argparse.Namespace) -> None:
    from modformer.convert.mom import mom_from_vanilla
    from modformer.models.io import atomic_save_model
    from modformer.models.loading import resolve_model_dir
    from modformer.models.model_card import Provenance

    src = resolve_model_dir(args.src)  # a model dir, a training out_dir or a HF GPT-2 dir
    options = {}
    if args.router_dim is not None:
        options["router_dim"] = args.router_dim
    if args.share_map is not None:
        try:
            options["share_map"] = [int(m) for m in args.share_map.split(",")]
        except ValueError:
            raise ConfigError(
                f"--share-map {args.share_map!r}: expected comma-separated module indices, "
                "e.g. '0,0,1,1'"
            ) from None
    model = mom_from_vanilla(
        src,
        chunks=args.chunks,
        mom_name=args.mom_name,
        router=args.router,
        policy=args.policy,
        mom_same=args.mom_same,
        **options,
    )
    atomic_save_model(model, args.dst, Path(src), Provenance(method="convert", source=str(src)))
    n = model.num_parameters()
    print(
        f"converted {args.src} -> {args.dst}: MoM {model.config.mom_name} chunks {model.config.chunks} ({n:,} parameters)"
    )


def run_convert_mom_official(args: argparse.Namespace) -> None:
    from modformer.convert.mom_official import convert_mom_official

    model = convert_mom_official(args.src, args.dst)
    n = model.num_parameters()
    print(
        f"converted {args.src} -> {args.dst}: MoM {model.config.mom_name} chunks {model.config.chunks} ({n:,} parameters)"
    )


# convert KIND -> its run function (the KINDs of `modformer.cli_args_models.add_convert_arguments`)
RUNS = {
    "gpt2": run_convert_gpt2,
    "moduleformer": run_convert_moduleformer,
    "jetmoe": run_convert_jetmoe,
    "mom": run_convert_mom,
    "mom-official": run_convert_mom_official,
}
