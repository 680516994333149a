"""Expert insertion for continual learning: extend, freeze, train, save/load, merge."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import AutoModelForCausalLM

from modformer.cli_args import add_extend_arguments
from modformer.commands.extend import run_extend
from modformer.data.dataset import TokenDataset
from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM
from modformer.surgery import (
    SurgeryError,
    apply_trainable_scope,
    extend_model,
    merge_inserted_experts,
)
from modformer.surgery.extend import is_inserted_parameter
from modformer.train.checkpoint import atomic_save_model
from modformer.train.config import load_train_config
from modformer.train.trainer import train

VOCAB = 64


def moduleformer(seed: int = 0, vocab_size: int = VOCAB, **overrides) -> ModuleFormerForCausalLM:
    torch.manual_seed(seed)
    config = ModuleFormerConfig.from_preset("tiny", vocab_size=vocab_size, n_layer=2, **overrides)
    return ModuleFormerForCausalLM(config).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_extend_adds_experts_and_freezes_the_rest():
    model = moduleformer()
    extended = extend_model(model, 3)
    config = extended.config
    assert (config.n_att_experts, config.n_ffd_experts) == (7, 11)
    assert (config.n_inserted_att_experts, config.n_inserted_ffd_experts) == (3, 3)
    assert config.trainable_scope == "inserted_experts"
    # The partially trainable router trains without load balancing (paper Table 9).
    assert config.aux_loss_weight == 0.0 and model.config.aux_loss_weight == 0.01
    assert extend_model(model, 1, aux_loss_weight=None).config.aux_loss_weight == 0.01
    for block in extended.transformer.h:
        assert block.attn.num_experts == 7 and block.mlp.num_experts == 11
        assert block.attn.w_q_inserted.shape == (3, 128, 64)
        assert block.mlp.w_out_inserted.shape == (3, 256, 128)
        assert block.mlp.router.expert_embedding_weight().shape == (11, 64)
    # The original parameters are copied exactly and are the frozen ones.
    original = model.state_dict()
    for name, value in extended.state_dict().items():
        if not is_inserted_parameter(name):
            assert torch.equal(value, original[name]), name
    expected = {
        f"transformer.h.{layer}.{kind}.{name}"
        for layer in range(2)
        for kind, names in (("attn", ("w_q", "w_o")), ("mlp", ("w_in", "w_out")))
        for name in (*(f"{n}_inserted" for n in names), "router.inserted_expert_embedding.weight")
    }
    assert trainable_names(extended) == expected
    # A' starts like A did: zero-mean rows of std initializer_range.
    rows = torch.cat(
        [b.mlp.router.inserted_expert_embedding.weight for b in extended.transformer.h]
    )
    assert abs(rows.std().item() - 0.02) < 0.004 and abs(rows.mean().item()) < 0.004

    with_embeddings = extend_model(model, 1, train_embeddings=True, ffn=False)
    names = trainable_names(with_embeddings)
    assert "transformer.wte.weight" in names  # the LM head is tied to it
    assert with_embeddings.lm_head.weight.requires_grad
    assert with_embeddings.config.n_inserted_ffd_experts == 0
    assert not any(".mlp." in name for name in names)


def test_untied_ibm_layout_extends_and_trains_its_head_with_the_embeddings():
    model = moduleformer(tie_word_embeddings=False, router_bias=True, kv_bias=True)
    extended = extend_model(model, 1, train_embeddings=True)
    original = model.state_dict()
    for name, value in extended.state_dict().items():
        if not is_inserted_parameter(name):
            assert torch.equal(value, original[name]), name  # biases and head copied
    names = trainable_names(extended)
    assert {"transformer.wte.weight", "lm_head.weight"} <= names
    assert not any("bias" in name for name in names)
    assert "lm_head.weight" not in trainable_names(extend_model(model, 1))


def test_extend_options_and_determinism():
    model = moduleformer()
    a = extend_model(model, 2, seed=5, router_init_std=0.0, routing_reg_weight=0.5)
    b = extend_model(model, 2, seed=5, router_init_std=0.0, routing_reg_weight=0.5)
    assert a.config.routing_reg_weight == 0.5
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    router = a.transformer.h[0].attn.router
    assert torch.count_nonzero(router.inserted_expert_embedding.weight) == 0
    # A' = 0: the new experts' logits are exactly 0.
    hidden = torch.randn(5, 128)
    assert torch.all(router(hidden).logits[:, -2:] == 0)


def test_extended_model_saves_loads_and_merges(tmp_path):
    extended = extend_model(moduleformer(), 2).eval()
    x = tokens()
    logits = extended(input_ids=x).logits
    extended.save_pretrained(tmp_path / "ext")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ext").eval()
    assert torch.equal(loaded(input_ids=x).logits, logits)
    assert loaded.config.trainable_scope == "inserted_experts"
    apply_trainable_scope(loaded)
    assert trainable_names(loaded) == trainable_names(extended)

    merged = merge_inserted_experts(loaded)
    assert merged.config.n_inserted_att_experts == 0 and merged.config.trainable_scope is None
    assert merged.transformer.h[1].mlp.w_in.shape[0] == 10
    assert all(p.requires_grad for p in merged.parameters())
    assert torch.equal(merged(input_ids=x).logits, logits)  # the same tensors, concatenated

    # Extending again merges the first insertion, which is then frozen too.
    twice = extend_model(loaded, 1)
    assert (twice.config.n_att_experts, twice.config.n_inserted_att_experts) == (7, 1)
    assert not twice.transformer.h[0].attn.w_q.requires_grad
    assert twice.transformer.h[0].attn.w_q.shape[0] == 6


def test_bad_input():
    model = moduleformer()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(SurgeryError, match="new_experts must be a positive integer"):
            extend_model(model, bad)
    with pytest.raises(SurgeryError, match="nothing to insert"):
        extend_model(model, 1, attention=False, ffn=False)
    with pytest.raises(SurgeryError, match="routing_reg_weight must be >= 0"):
        extend_model(model, 1, routing_reg_weight=-1.0)
    gpt = GPTForCausalLM(GPTConfig.from_preset("tiny", vocab_size=VOCAB))
    with pytest.raises(SurgeryError, match="needs a ModuleFormer model .* got a GPTForCausalLM"):
        extend_model(gpt, 1)
    mom = MoMForCausalLM(MoMConfig.from_preset("tiny", vocab_size=VOCAB))
    with pytest.raises(SurgeryError, match="got a MoMForCausalLM"):
        extend_model(mom, 1)
    # A scope with nothing to train is refused rather than freezing the whole model.
    plain = moduleformer(trainable_scope="inserted_experts")
    with pytest.raises(ValueError, match="no inserted experts"):
        apply_trainable_scope(plain)
    assert apply_trainable_scope(gpt)["frozen"] == 0  # no scope: left as it is


# ---- training with the trainer -------------------------------------------------------


def train_extended(tmp_path, data_dir, name: str, routing_reg_weight: float):
    """Extend a tiny model, train it 15 steps with `modformer train`; returns
    (extended model before training, trained model)."""
    vocab = TokenDataset(data_dir, "train").vocab_size
    extended = extend_model(
        moduleformer(vocab_size=vocab), 2, routing_reg_weight=routing_reg_weight
    )
    start = atomic_save_model(extended, tmp_path / f"{name}_start", data_dir / "tokenizer")
    cfg = load_train_config(
        overrides=[
            f"model.init_from={start}",
            f"data.dir={data_dir}",
            f"out_dir={tmp_path / name}",
            "max_steps=15",
            "batch_size=4",
            "data.block_size=32",
            "eval_batches=1",
            "progress=false",
            "optim.warmup_steps=2",
            "optim.lr=3e-3",
            "optim.weight_decay=0.1",  # decay must not move frozen weights either
            "ckpt_interval=0",
            "eval_interval=0",
        ]
    )
    train(cfg)
    return extended, AutoModelForCausalLM.from_pretrained(tmp_path / name / "model")


def inserted_router_norm(model) -> float:
    return sum(
        float(p.detach().square().sum())
        for name, p in model.named_parameters()
        if name.endswith("inserted_expert_embedding.weight")
    )


def test_training_changes_only_inserted_experts(tmp_path, tiny_data_dir):
    results = {w: train_extended(tmp_path, tiny_data_dir, f"reg{w}", w) for w in (0.0, 1.0)}
    before, after = results[0.0]
    after_state = after.state_dict()
    changed = set()
    for name, value in before.state_dict().items():
        if is_inserted_parameter(name):
            if not torch.equal(value, after_state[name]):
                changed.add(name)
        else:
            assert torch.equal(value, after_state[name]), f"frozen {name} changed"
    assert changed == {n for n in before.state_dict() if is_inserted_parameter(n)}
    # The trained model keeps its scope, so the next run freezes the same parameters.
    assert after.config.trainable_scope == "inserted_experts"

    # The routing regulariser ||A'||^2 keeps the new router rows small (measured: 0.19 at
    # the start, 0.33 after 15 steps without it, 0.02 with weight 1).
    start = inserted_router_norm(before)
    assert inserted_router_norm(results[1.0][0]) == start  # both runs start alike
    assert inserted_router_norm(after) > start
    assert inserted_router_norm(results[1.0][1]) < 0.5 * start


def test_extend_command(tmp_path, tiny_data_dir, capsys):
    vocab = TokenDataset(tiny_data_dir, "train").vocab_size
    source = atomic_save_model(
        moduleformer(vocab_size=vocab), tmp_path / "src", tiny_data_dir / "tokenizer"
    )
    parser = argparse.ArgumentParser()
    add_extend_arguments(parser)
    args = parser.parse_args(
        [
            str(source),
            str(tmp_path / "ext"),
            "--new-experts",
            "2",
            "--only",
            "ffn",
            "--train-embeddings",
            "--routing-reg-weight",
            "0.25",
        ]
    )
    extended = run_extend(args)
    assert "parameters:" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ext")
    assert (tmp_path / "ext" / "tokenizer.json").is_file()
    config = loaded.config
    assert (config.n_inserted_att_experts, config.n_inserted_ffd_experts) == (0, 2)
    assert config.trainable_scope == "inserted_experts+embeddings"
    assert config.routing_reg_weight == 0.25 and config.aux_loss_weight == 0.0
    apply_trainable_scope(loaded)
    assert trainable_names(loaded) == trainable_names(extended)
