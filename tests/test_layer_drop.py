"""Dropping whole layers (the layer-wise pruning baseline of ModuleFormer sec. 5.3)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM
from modformer.surgery import SurgeryError, drop_layers, prune_model
from modformer.surgery.layer_drop import layer_drop_ratios, layers_to_keep

VOCAB = 64


def gpt(n_layer: int = 4) -> GPTForCausalLM:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, n_positions=64, n_embd=32, n_head=2, n_layer=n_layer)
    return GPTForCausalLM(config).eval()


def moduleformer(n_layer: int = 4) -> ModuleFormerForCausalLM:
    torch.manual_seed(0)
    config = ModuleFormerConfig.from_preset("tiny", vocab_size=VOCAB, n_layer=n_layer)
    return ModuleFormerForCausalLM(config).eval()


def with_blocks(model, keep: list[int]):
    """The reference: the same model running only the blocks `keep`, in order."""
    reference = copy.deepcopy(model)
    reference.transformer.h = nn.ModuleList(reference.transformer.h[i] for i in keep)
    return reference


def test_layers_to_keep():
    assert layers_to_keep(4, 2, "top") == [0, 1]
    assert layers_to_keep(4, 2, "uniform") == [0, 3]
    assert layers_to_keep(4, 3, "uniform") == [0, 2, 3]
    assert layers_to_keep(8, 3, "uniform") == [0, 4, 7]
    assert layers_to_keep(5, 5, "uniform") == [0, 1, 2, 3, 4]
    assert layers_to_keep(4, 1, "uniform") == [0]
    for n_layer in range(1, 9):
        for n in range(1, n_layer + 1):
            kept = layers_to_keep(n_layer, n, "uniform")
            assert len(set(kept)) == n and kept == sorted(kept) and kept[-1] < n_layer
    with pytest.raises(SurgeryError, match="can keep 1..4"):
        layers_to_keep(4, 0, "top")
    with pytest.raises(SurgeryError, match="can keep 1..4"):
        layers_to_keep(4, 5, "top")
    with pytest.raises(SurgeryError, match="strategy must be one of"):
        layers_to_keep(4, 2, "bottom")


@pytest.mark.parametrize("make", [gpt, moduleformer], ids=["gpt", "moduleformer"])
@pytest.mark.parametrize("strategy", ["top", "uniform"])
def test_dropped_model_runs_exactly_the_kept_blocks(make, strategy, tmp_path):
    model = make()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    dropped, report = drop_layers(model, 2, strategy)
    keep = layers_to_keep(4, 2, strategy)
    assert report["kept_layers"] == keep and dropped.config.n_layer == 2
    with torch.no_grad():
        expected = with_blocks(model, keep)(input_ids=x, use_cache=False).logits
        got = dropped.eval()(input_ids=x, use_cache=False).logits
        full = model(input_ids=x, use_cache=False).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, full, atol=1e-3)  # the dropped layers did matter
    assert len(model.transformer.h) == 4  # the input is untouched
    # An ordinary model of the same class: saves, loads and counts its parameters.
    dropped.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is type(model)
    assert loaded.num_parameters() == report["params_after"]
    assert report["params_ratio"] == pytest.approx(layer_drop_ratios(model)[2], abs=1e-12)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x, use_cache=False).logits, got)


def test_keeping_every_layer_is_the_same_model():
    model = moduleformer()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    same, report = drop_layers(model, 4, "uniform")
    assert report["params_ratio"] == 1.0
    with torch.no_grad():
        assert torch.equal(same(input_ids=x).logits, model(input_ids=x).logits)


def test_layer_drop_ratios_count_the_parameters():
    model = gpt()
    ratios = layer_drop_ratios(model)
    assert sorted(ratios) == [1, 2, 3, 4] and ratios[4] == 1.0
    for n, ratio in ratios.items():
        dropped, _ = drop_layers(model, n, "top")
        assert dropped.num_parameters() / model.num_parameters() == pytest.approx(ratio)


def test_dropping_layers_of_a_pruned_moduleformer_slices_its_per_layer_config():
    model = moduleformer()
    frequencies = {f"layer{i}/attn": [1.0, 1.0, 0.0, 0.0] for i in range(4)}
    frequencies |= {f"layer{i}/ffn": [1.0] * (2 + i) + [0.0] * (6 - i) for i in range(4)}
    pruned, _ = prune_model(model, frequencies, threshold=0.5)
    dropped, report = drop_layers(pruned, 2, "uniform")  # layers 0 and 3
    assert dropped.config.ffd_experts_per_layer == [2, 5]
    assert dropped.config.ffd_expert_slots == [[0, 1], [0, 1, 2, 3, 4]]
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = with_blocks(pruned, report["kept_layers"])(input_ids=x, use_cache=False)
        assert torch.equal(dropped(input_ids=x, use_cache=False).logits, expected.logits)


def test_mom_is_refused():
    config = MoMConfig.from_preset("tiny", vocab_size=VOCAB, chunks="[1-4-1]", mom="K2H2S")
    with pytest.raises(SurgeryError, match="dense GPT or a ModuleFormer"):
        drop_layers(MoMForCausalLM(config), 1, "top")
