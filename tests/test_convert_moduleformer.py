"""`convert moduleformer`: IBM ModuleFormer / MoLM checkpoints written by the official code.

The fixtures (../shared/fixtures/official/moduleformer, described in its README) are tiny
random checkpoints saved by IBM's own class, with the logits that class computed in fp64.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modformer.cli import main
from modformer.convert.gpt2 import ConversionError
from modformer.convert.moduleformer import load_moduleformer_directory
from modformer.models.loading import load_model
from modformer.nn.moe_losses import mutual_information_loss


def _fixture_root() -> Path | None:
    """``shared/fixtures/official/moduleformer`` under $MODFORMER_SHARED_DIR, else beside
    the repository (as CI clones it) or beside a folder holding it (a git worktree)."""
    if os.environ.get("MODFORMER_SHARED_DIR"):
        root = Path(os.environ["MODFORMER_SHARED_DIR"]) / "fixtures" / "official" / "moduleformer"
        return root if root.is_dir() else None
    for parent in Path(__file__).resolve().parents[1:]:
        root = parent / "shared" / "fixtures" / "official" / "moduleformer"
        if root.is_dir():
            return root
    return None


FIXTURES = _fixture_root()
pytestmark = pytest.mark.skipif(
    FIXTURES is None,
    reason="the official fixtures (../shared/fixtures/official/moduleformer) are not present",
)
NAMES = ["two_heads_kv", "one_head_identity_kv"]


@pytest.fixture(autouse=True)
def one_cpu_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / name / "reference.safetensors")


def edited_copy(
    tmp_path: Path, name: str, config: dict | None = None, weights=None, pickled: bool = False
) -> Path:
    """A copy of fixture `name` with config fields overridden and weights edited."""
    dst = tmp_path / f"edited_{name}"
    dst.mkdir(parents=True)
    hf = json.loads((FIXTURES / name / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**hf, **(config or {})}))
    state = load_file(FIXTURES / name / "model.safetensors")
    if weights is not None:
        state = weights(state)
    if pickled:
        torch.save(state, dst / "pytorch_model.bin")
    else:
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_the_official_code(name):
    model = load_moduleformer_directory(FIXTURES / name)
    ref = reference(name)
    assert model.dtype == torch.float32
    with torch.no_grad():
        plain = model(ref["input_ids"], use_cache=False).logits
        padded = model(
            ref["input_ids"], attention_mask=ref["attention_mask"], use_cache=False
        ).logits
    torch.testing.assert_close(plain, ref["logits"], atol=1e-4, rtol=0)
    real = ref["attention_mask"].bool()  # padded positions mean nothing in the reference
    torch.testing.assert_close(padded[real], ref["padded_logits"][real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
@pytest.mark.parametrize("name", NAMES)
def test_cached_generate_equals_an_argmax_loop_of_full_forwards(name, padded):
    model = load_moduleformer_directory(FIXTURES / name)
    ref = reference(name)
    prompt = ref["input_ids"][:, :7]  # row 1 starts with 3 padding tokens
    mask = ref["attention_mask"][:, :7] if padded else torch.ones_like(prompt)
    with torch.no_grad():
        generated = model.generate(
            prompt,
            attention_mask=mask,
            max_new_tokens=7,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        ids = prompt
        for _ in range(7):
            logits = model(ids, attention_mask=mask, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("name", NAMES)
def test_cli_converts_and_the_saved_model_reloads(name, tmp_path, capsys):
    dst = tmp_path / "imported"
    assert main(["convert", "moduleformer", str(FIXTURES / name), str(dst)]) == 0
    assert "active per token" in capsys.readouterr().out
    model = load_model(dst, "cpu")
    config = model.config
    assert config.router_bias and config.router_activation == "gelu"
    assert config.kv_bias == (name == "two_heads_kv")  # identity K/V have no biases
    assert not config.tie_word_embeddings
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert config.layer_norm_epsilon == 1e-5
    assert config.use_history and config.history_length == -1  # IBM keeps all history
    assert config.eos_token_id is None  # 50256 is outside the fixture's vocabulary
    ref = reference(name)
    with torch.no_grad():
        logits = model(ref["input_ids"], use_cache=False).logits
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)


def test_cli_history_length_caps_the_memory(tmp_path):
    dst = tmp_path / "imported"
    src = FIXTURES / "two_heads_kv"
    assert main(["convert", "moduleformer", str(src), str(dst), "--history-length", "4"]) == 0
    model = load_model(dst, "cpu")
    ids = reference("two_heads_kv")["input_ids"]
    memory = model(ids, use_cache=False).memory
    assert model.config.history_length == 4 and memory.length == 4


def test_aux_loss_weight_is_scaled_to_ibms_sum_over_routers(tmp_path):
    src = edited_copy(tmp_path, "one_head_identity_kv", config=dict(aux_loss_weight=0.01))
    model = load_moduleformer_directory(src)
    n_layer = model.config.n_layer
    assert model.config.aux_loss_weight == pytest.approx(0.01 * 2 * n_layer)
    ids = reference("one_head_identity_kv")["input_ids"]
    out = model.transformer(ids, use_cache=False)
    aux, _ = model.auxiliary_losses(out.router_outputs, out.token_mask)
    # IBM: aux_loss_weight * (sum over every layer's attention and MLP router of its MI loss)
    ibm = 0.01 * sum(
        mutual_information_loss(route.logits) for routes in out.router_outputs for route in routes
    )
    torch.testing.assert_close(aux, ibm, atol=1e-7, rtol=1e-6)


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path):
    src = edited_copy(tmp_path, "two_heads_kv", pickled=True)
    assert not (src / "model.safetensors").exists()
    ref = reference("two_heads_kv")
    with torch.no_grad():
        logits = load_moduleformer_directory(src)(ref["input_ids"], use_cache=False).logits
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)


class NeedsCode:
    """A pickled instance needs this class's code: weights_only loading must refuse it."""


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    src = edited_copy(tmp_path, "two_heads_kv", pickled=True)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": NeedsCode()}, src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="needs code to unpickle"):
        load_moduleformer_directory(src)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(model_type="gpt2"), "not IBM's 'moduleformer'"),
        (dict(gate_type="linear"), "gate_type='linear'"),
        (dict(gate_type="gmm"), "gate_type='gmm'"),
        (dict(sample_topk=1), "sample_topk=1"),
        (dict(moe_pdrop=0.1), "moe_pdrop=0.1"),
        (dict(embd_pdrop=0.1), "embd_pdrop=0.1 != resid_pdrop=0.0"),
        (dict(activation_function="swish9"), "activation_function='swish9'"),
        (dict(k_att=9), "k_att"),
    ],
)
def test_unrepresentable_configs_are_refused_by_name(tmp_path, config, message):
    src = edited_copy(tmp_path, "two_heads_kv", config=config)
    with pytest.raises(ConversionError, match=message):
        load_moduleformer_directory(src)


def test_training_only_options_can_be_dropped_explicitly(tmp_path):
    src = edited_copy(tmp_path, "two_heads_kv", config=dict(sample_topk=1, moe_pdrop=0.1))
    model = load_moduleformer_directory(src, drop_training_options=True)
    ref = reference("two_heads_kv")
    with torch.no_grad():
        logits = model(ref["input_ids"], use_cache=False).logits
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)


def test_a_tied_checkpoint_imports_tied(tmp_path):
    def tie(state):
        return {**state, "lm_head.weight": state["transformer.wte.weight"].clone()}

    src = edited_copy(tmp_path, "two_heads_kv", config=dict(tie_word_embeddings=True), weights=tie)
    model = load_moduleformer_directory(src)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = reference("two_heads_kv")["input_ids"]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    expected = model.transformer(ids, use_cache=False).last_hidden_state @ model.lm_head.weight.T
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    untied = edited_copy(tmp_path / "u", "two_heads_kv", config=dict(tie_word_embeddings=True))
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        load_moduleformer_directory(untied)


def test_cli_drop_training_options(tmp_path, capsys):
    src = edited_copy(tmp_path, "two_heads_kv", config=dict(sample_topk=1))
    dst = tmp_path / "imported"
    assert main(["convert", "moduleformer", str(src), str(dst)]) == 2
    assert "--drop-training-options" in capsys.readouterr().err
    assert main(["convert", "moduleformer", str(src), str(dst), "--drop-training-options"]) == 0
    assert (dst / "config.json").is_file()


def _drop(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    ("config", "weights", "message"),
    [
        # One more attention expert in the config than in the weights.
        (dict(n_att_experts=4), None, r"q_proj\.experts\.weight has shape \(3, 40, 24\)"),
        (None, _drop("transformer.h.1.mlpf.gate.w_gate.0.bias"), r"missing.*h\.1\.mlpf\.gate"),
        (None, _drop("lm_head.weight"), r"missing \['lm_head.weight'\]"),
        (None, _drop("transformer.h.0.attn.v_proj.weight"), r"h\.0\.attn\.v_proj\.weight"),
        (
            None,
            lambda s: {**s, "transformer.h.0.attn.extra.weight": torch.zeros(2)},
            r"unknown .*transformer\.h\.0\.attn\.extra\.weight",
        ),
        # Weights of a third layer that the config does not have.
        (dict(n_layer=1), None, r"unexpected \['transformer\.h\.1\."),
    ],
)
def test_weights_that_do_not_fit_name_the_keys(tmp_path, config, weights, message):
    src = edited_copy(tmp_path, "two_heads_kv", config=config, weights=weights)
    with pytest.raises(ConversionError, match=message):
        load_moduleformer_directory(src)


def test_a_directory_without_weights_or_config_is_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        load_moduleformer_directory(tmp_path / "empty")
    shutil.copy(FIXTURES / "two_heads_kv" / "config.json", tmp_path / "empty")
    with pytest.raises(ConversionError, match="no model.safetensors"):
        load_moduleformer_directory(tmp_path / "empty")
    assert main(["convert", "moduleformer", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
