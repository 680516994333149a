"""`modformer train`: settings from --config, then --set, then the per-setting options."""

from __future__ import annotations

import argparse
import os

from modformer.cli_args_train import collect_cli_overrides
from modformer.train.config import TrainConfig, load_train_config


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The file (--config) < --set overrides < the `--section.field` options given."""
    return load_train_config(args.config, args.set, collect_cli_overrides(args, TrainConfig))


def run_train(args: argparse.Namespace) -> dict:
    from modformer.train.trainer import train

    cfg = train_config_from_args(args)
    final = train(cfg, resume=args.resume, overwrite=args.overwrite)
    # Under torchrun every rank returns; one line is enough (RANK is torchrun's).
    if "val_loss" in final and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"final val loss {final['val_loss']:.4f}  ppl {final['val_ppl']:.2f}  -> {cfg.out_dir}/model"
        )
    return final
