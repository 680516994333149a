"""`modformer extend`: insert new experts for continual learning, freezing the old ones."""

from __future__ import annotations

import argparse

from transformers import PreTrainedModel

from modformer.surgery.extend import (
    count_parameters,
    extend_model,
    load_model_dir,
    save_model_with_tokenizer,
)


def run_extend(args: argparse.Namespace) -> PreTrainedModel:
    model = load_model_dir(args.model)
    before = count_parameters(model)
    extended = extend_model(
        model,
        args.new_experts,
        attention=args.only != "ffn",
        ffn=args.only != "attention",
        train_embeddings=args.train_embeddings,
        routing_reg_weight=args.routing_reg_weight,
        aux_loss_weight=None if args.aux_loss_weight < 0 else args.aux_loss_weight,
        router_init_std=args.router_init_std,
        seed=args.seed,
    )
    save_model_with_tokenizer(extended, args.out, args.model, method="extend")
    trainable = count_parameters(extended, trainable_only=True)
    config = extended.config
    print(
        f"parameters: {before:,} -> {count_parameters(extended):,} "
        f"({trainable:,} trainable: {config.n_inserted_att_experts} attention + "
        f"{config.n_inserted_ffd_experts} FFN experts per layer and their router rows"
        f"{', token embedding' if args.train_embeddings else ''})"
    )
    print(
        f"wrote {args.out}; train it with `modformer train --set model.init_from={args.out} "
        "...` (the freezing is re-applied from config.trainable_scope)"
    )
    return extended
