"""Official MoM (gzhch/Mixture-of-Modules, model_type gpt2-mot) import, and the MoM options
it needs: router temperature, raw-logit routers, all-SKIP tokens as zero keys.

The fixtures in ../shared/fixtures/official/mom/ were written by the official code itself
(with its fp64 logits). For the official options no fixture covers (raw-logit and MLP
routers, K=1 with SKIP, weighted q/k/v) `official_logits` below re-implements the official
forward token by token, module by module, from the semantics in the fixtures' README; it
is first checked against the fixtures.
"""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import modformer  # noqa: F401  (registers the Auto classes)
from modformer.analysis.usage import collect_usage
from modformer.cli import main
from modformer.convert.checkpoint_files import ConversionError, load_pickled_state_dict
from modformer.convert.mom_official import load_mom_official, official_config_to_mom
from modformer.eval.costs import inference_flops
from modformer.models.mom import MoMConfig, MoMForCausalLM
from modformer.nn.routers import top_k_routing
from modformer.surgery import prune_model

# ../shared beside the repository (as CI clones it); MODFORMER_SHARED_DIR overrides that,
# e.g. for a git worktree that lives elsewhere.
SHARED = Path(os.environ.get("MODFORMER_SHARED_DIR", Path(__file__).parents[2] / "shared"))
FIXTURES = SHARED / "fixtures" / "official" / "mom"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"official MoM fixtures not found at {FIXTURES} (clone the shared repo beside this one)",
)


def fixture_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def one_weight_file(tmp_path: Path, name: str, weights: str) -> Path:
    """A copy of fixture `name` with only its `weights` file."""
    dst = tmp_path / f"{name}-{weights}"
    dst.mkdir()
    shutil.copy(FIXTURES / name / "config.json", dst)
    shutil.copy(FIXTURES / name / weights, dst)
    return dst


def write_official(directory: Path, hf: dict, state: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf))
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    return directory


# ---- a plain re-implementation of the official forward ---------------------------------


def _layer_norm(x, state, key, eps):
    return F.layer_norm(x, (x.shape[-1],), state[f"{key}.weight"], state[f"{key}.bias"], eps)


def _conv1d(x, state, key):  # GPT-2 Conv1D: (in, out) weight
    return x @ state[f"{key}.weight"] + state[f"{key}.bias"]


def _official_router(x, hidden, state, key, hf):
    """Scores over the choices (softmaxed at T for 'softmax' routers) and the GRU state."""
    r = hf["router_dim"]
    if "naive" in hf["router_type"]:
        h1 = torch.relu(x @ state[f"{key}.router.0.weight"].T + state[f"{key}.router.0.bias"])
        scores = h1 @ state[f"{key}.router.2.weight"].T + state[f"{key}.router.2.bias"]
    else:
        if hidden is None:
            hidden = x.new_zeros(x.shape[0], r)
        gx = x @ state[f"{key}.x2h.weight"].T + state[f"{key}.x2h.bias"]
        gh = hidden @ state[f"{key}.h2h.weight"].T + state[f"{key}.h2h.bias"]
        reset = torch.sigmoid(gx[:, :r] + gh[:, :r])
        update = torch.sigmoid(gx[:, r : 2 * r] + gh[:, r : 2 * r])
        new = torch.tanh(gx[:, 2 * r :] + reset * gh[:, 2 * r :])
        hidden = new + update * (hidden - new)
        scores = hidden @ state[f"{key}.router.weight"].T + state[f"{key}.router.bias"]
    if "softmax" in hf["router_type"]:
        scores = torch.softmax(scores / hf["router_softmax_temperature"], -1)
    return scores, hidden


def _official_picks(scores, hf):
    top, ids = scores.topk(min(hf["routing_top_k"], scores.shape[-1]), -1)
    if "softmax" in hf["router_type"]:
        top = top / top.sum(-1, keepdim=True)
    return top, ids


def _attention(q, k, v, n_head, additive_mask):
    B, T, d = q.shape
    hd = d // n_head
    q, k, v = (t.view(B, T, n_head, hd).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = torch.where(causal, scores, torch.finfo(scores.dtype).min) + additive_mask
    return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, d)


@torch.no_grad()
def official_logits(hf: dict, state: dict[str, torch.Tensor], ids, attention_mask=None):
    """The official GPT2MoTLMHeadModel forward (no cache, positions arange(T)), with every
    routed module applied to its tokens in a Python loop. All-SKIP tokens keep q = k = v
    = 0 and so stay in the keys."""
    eps, n_head = hf["layer_norm_epsilon"], hf["n_head"]
    n_attn, n_ffn = hf["num_attn"], hf["num_ffn"]  # picks at or above a pool's size: nothing
    B, T = ids.shape
    x = state["transformer.wte.weight"][ids] + state["transformer.wpe.weight"][:T][None]
    additive = torch.zeros(B, 1, 1, T, dtype=x.dtype)
    if attention_mask is not None:
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    kinds = ["fixed"] * hf["num_bottom_layers"]
    kinds += (["chunk", "fixed"] if hf["require_anchor_layer"] else ["chunk"]) * hf["chunks"]
    kinds += ["fixed"] * hf["num_top_layers"]
    act = {"gelu_new": lambda t: F.gelu(t, approximate="tanh"), "relu": torch.relu}[
        hf["activation_function"]
    ]
    for i, kind in enumerate(kinds):
        p = f"transformer.h.{i}"
        if kind == "fixed":
            a = _layer_norm(x, state, f"{p}.mot_attn.attention_layernorm", eps)
            q, k, v = _conv1d(a, state, f"{p}.mot_attn.c_attn").split(x.shape[-1], -1)
            x = x + _conv1d(_attention(q, k, v, n_head, additive), state, f"{p}.mot_attn.c_proj")
            m = _layer_norm(x, state, f"{p}.mot_ffn.ffn_layernorm", eps)
            x = x + _conv1d(
                act(_conv1d(m, state, f"{p}.mot_ffn.c_fc")), state, f"{p}.mot_ffn.c_proj"
            )
            continue
        attn_state = ffn_state = None
        for _ in range(hf["depth_per_chunk"]):
            flat = x.reshape(B * T, -1)
            scores, attn_state = _official_router(
                flat, attn_state, state, f"{p}.mot_attn.router", hf
            )
            top, picks = _official_picks(scores, hf)
            qkv = torch.zeros(B * T, 3 * x.shape[-1], dtype=x.dtype)
            for t in range(B * T):
                for w, j in zip(top[t], picks[t].tolist()):
                    if j >= n_attn:
                        continue  # SKIP, or a choice beyond the attention pool
                    row = _layer_norm(flat[t], state, f"{p}.mot_attn.attention_layernorm.{j}", eps)
                    row = _conv1d(row, state, f"{p}.mot_attn.c_attn.{j}")
                    qkv[t] += row * w if hf["weighted_qkv"] else row
            q, k, v = qkv.view(B, T, -1).split(x.shape[-1], -1)
            heads = _attention(q, k, v, n_head, additive).reshape(B * T, -1)
            out = torch.zeros_like(flat)
            for t in range(B * T):
                for w, j in zip(top[t], picks[t].tolist()):
                    if j < n_attn:
                        out[t] += w * _conv1d(heads[t], state, f"{p}.mot_attn.c_proj.{j}")
            x = x + out.view(B, T, -1)
            flat = x.reshape(B * T, -1)
            scores, ffn_state = _official_router(flat, ffn_state, state, f"{p}.mot_ffn.router", hf)
            top, picks = _official_picks(scores, hf)
            out = torch.zeros_like(flat)
            for t in range(B * T):
                for w, j in zip(top[t], picks[t].tolist()):
                    if j < n_ffn:
                        row = _layer_norm(flat[t], state, f"{p}.mot_ffn.ffn_layernorm.{j}", eps)
                        row = act(_conv1d(row, state, f"{p}.mot_ffn.c_fc.{j}"))
                        out[t] += w * _conv1d(row, state, f"{p}.mot_ffn.c_proj.{j}")
            x = x + out.view(B, T, -1)
    x = _layer_norm(x, state, "transformer.ln_f", eps)
    return x @ state["transformer.wte.weight"].T


def random_official(hf: dict, seed: int = 0, skip_bias: float = 0.0) -> dict[str, torch.Tensor]:
    """A random state dict in the official layout of `hf` (biases and LN affines too)."""
    g = torch.Generator().manual_seed(seed)
    D, V, r = hf["n_embd"], hf["vocab_size"], hf["router_dim"]
    F_ = hf["n_inner"] or 4 * D
    n_attn, n_ffn = hf["num_attn"], hf["num_ffn"]
    # Router choices: GRU max(N_A, N_F) (+ SKIP), the MLP router num_ffn (+ SKIP).
    widest = n_ffn if "naive" in hf["router_type"] else max(n_attn, n_ffn)
    C = widest + int(hf["enable_pause"])

    def rnd(*shape, std=0.3, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    state = {
        "transformer.wte.weight": rnd(V, D, std=1.0),
        "transformer.wpe.weight": rnd(hf["n_positions"], D, std=1.0),
        "transformer.ln_f.weight": rnd(D, mean=1.0),
        "transformer.ln_f.bias": rnd(D),
    }
    kinds = ["fixed"] * hf["num_bottom_layers"]
    kinds += (["chunk", "fixed"] if hf["require_anchor_layer"] else ["chunk"]) * hf["chunks"]
    kinds += ["fixed"] * hf["num_top_layers"]
    attn_projections = (("c_attn", (D, 3 * D)), ("c_proj", (D, D)))
    ffn_projections = (("c_fc", (D, F_)), ("c_proj", (F_, D)))
    for i, kind in enumerate(kinds):
        p = f"transformer.h.{i}"
        for owner, ln, projections, n in (
            ("mot_attn", "attention_layernorm", attn_projections, n_attn),
            ("mot_ffn", "ffn_layernorm", ffn_projections, n_ffn),
        ):
            for s in [""] if kind == "fixed" else [f".{j}" for j in range(n)]:
                state[f"{p}.{owner}.{ln}{s}.weight"] = rnd(D, mean=1.0)
                state[f"{p}.{owner}.{ln}{s}.bias"] = rnd(D)
                for name, shape in projections:
                    std = 1.0 / math.sqrt(shape[0])
                    state[f"{p}.{owner}.{name}{s}.weight"] = rnd(*shape, std=std)
                    state[f"{p}.{owner}.{name}{s}.bias"] = rnd(shape[1], std=0.1)
        if kind == "chunk":
            for owner in ("mot_attn", "mot_ffn"):
                key = f"{p}.{owner}.router"
                if "naive" in hf["router_type"]:
                    state[f"{key}.router.0.weight"] = rnd(r, D, std=0.25)
                    state[f"{key}.router.0.bias"] = rnd(r)
                    state[f"{key}.router.2.weight"] = rnd(C, r, std=0.3)
                    state[f"{key}.router.2.bias"] = rnd(C)
                else:
                    state[f"{key}.x2h.weight"] = rnd(3 * r, D, std=1.0)
                    state[f"{key}.x2h.bias"] = rnd(3 * r)
                    state[f"{key}.h2h.weight"] = rnd(3 * r, r, std=1.0)
                    state[f"{key}.h2h.bias"] = rnd(3 * r)
                    state[f"{key}.router.weight"] = rnd(C, r, std=0.3)
                    state[f"{key}.router.bias"] = rnd(C)
                if hf["enable_pause"]:
                    bias_key = (
                        f"{key}.router.2.bias"
                        if "naive" in hf["router_type"]
                        else f"{key}.router.bias"
                    )
                    state[bias_key][-1] += skip_bias
    return state


def small_official_config(**overrides) -> dict:
    hf = {
        "model_type": "gpt2-mot",
        "vocab_size": 37,
        "n_positions": 16,
        "n_embd": 16,
        "n_head": 2,
        "n_inner": 24,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "num_bottom_layers": 1,
        "chunks": 1,
        "require_anchor_layer": True,
        "num_top_layers": 0,
        "num_attn": 3,
        "num_ffn": 3,
        "depth_per_chunk": 3,
        "depth_multiplier": 4,
        "routing_top_k": 2,
        "enable_pause": True,
        "router_type": "gru_softmax",
        "router_dim": 6,
        "router_softmax_temperature": 1.0,
        "weighted_qkv": False,
        "use_ste": False,
        "routing_all_possible_path": False,
    }
    return {**hf, **overrides}


# ---- the shared fixtures ---------------------------------------------------------------

FIXTURE_FILES = [
    ("k2h3s_gru_softmax", "model.safetensors"),
    ("k2h3s_gru_softmax", "pytorch_model.bin"),
    ("k2h3s_temp02", "model.safetensors"),
]


@needs_fixtures
@pytest.mark.parametrize("name, weights", FIXTURE_FILES)
def test_fixture_logits_match_the_official_code(tmp_path, name, weights):
    torch.set_num_threads(1)
    model = load_mom_official(one_weight_file(tmp_path, name, weights))
    hf = fixture_config(name)
    assert model.config.router_temperature == hf["router_softmax_temperature"]
    assert (model.config.K, model.config.H, model.config.skip) == (2, 3, True)
    assert model.config.all_skip_tokens == "zero_key" and model.config.router == "gru"
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    ref = load_file(FIXTURES / name / "reference.safetensors")
    real = ref["attention_mask"].bool()
    with torch.no_grad():
        plain = model(ref["input_ids"]).logits.double()
        # Official position ids are arange(T) even with padding, as ours by default.
        padded = model(ref["input_ids"], attention_mask=ref["attention_mask"]).logits.double()
    assert (plain - ref["logits"]).abs().max() < 1e-4
    assert (padded - ref["padded_logits"])[real].abs().max() < 1e-4


@needs_fixtures
def test_temperature_changes_the_fixture_logits(tmp_path):
    """Without the temperature the T = 0.2 fixture is off by order 1 (a real test)."""
    model = load_mom_official(FIXTURES / "k2h3s_temp02")
    ref = load_file(FIXTURES / "k2h3s_temp02" / "reference.safetensors")
    for chunk in model.transformer.chunks:
        chunk.policy.temperature = 1.0
    with torch.no_grad():
        assert (model(ref["input_ids"]).logits.double() - ref["logits"]).abs().max() > 0.5


@needs_fixtures
@pytest.mark.parametrize("name", ["k2h3s_gru_softmax", "k2h3s_temp02"])
def test_plain_official_reimplementation_matches_the_fixtures(name):
    """The loop reference used below for options without fixtures reproduces the official
    code on the fixtures (fp64)."""
    hf = fixture_config(name)
    state = {k: v.double() for k, v in load_file(FIXTURES / name / "model.safetensors").items()}
    ref = load_file(FIXTURES / name / "reference.safetensors")
    real = ref["attention_mask"].bool()
    torch.testing.assert_close(official_logits(hf, state, ref["input_ids"]), ref["logits"])
    padded = official_logits(hf, state, ref["input_ids"], ref["attention_mask"])
    torch.testing.assert_close(padded[real], ref["padded_logits"][real])


@needs_fixtures
def test_cli_converts_and_the_result_loads_with_auto_classes(tmp_path, capsys):
    src = one_weight_file(tmp_path, "k2h3s_gru_softmax", "pytorch_model.bin")
    dst = tmp_path / "ours"
    assert main(["convert", "mom-official", str(src), str(dst)]) == 0
    assert "MoM K2H3S chunks [1-3-1]" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert isinstance(loaded, MoMForCausalLM) and loaded.config.all_skip_tokens == "zero_key"
    ref = load_file(FIXTURES / "k2h3s_gru_softmax" / "reference.safetensors")
    with torch.no_grad():
        assert (loaded(ref["input_ids"]).logits.double() - ref["logits"]).abs().max() < 1e-4
    assert main(["convert", "mom-official", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "is not a directory" in capsys.readouterr().err


@needs_fixtures
def test_sharded_safetensors(tmp_path):
    state = load_file(FIXTURES / "k2h3s_temp02" / "model.safetensors")
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / shard)
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(FIXTURES / "k2h3s_temp02" / "config.json", tmp_path)
    model = load_mom_official(tmp_path)
    ref = load_file(FIXTURES / "k2h3s_temp02" / "reference.safetensors")
    with torch.no_grad():
        assert (model(ref["input_ids"]).logits.double() - ref["logits"]).abs().max() < 1e-4


# ---- pickles ---------------------------------------------------------------------------


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(small_official_config()))
    torch.save(
        {"transformer.wte.weight": torch.zeros(2), "payload": _RunsCodeWhenUnpickled(marker)},
        src / "pytorch_model.bin",
    )
    with pytest.raises(ConversionError, match=r"needs code to unpickle.*weights_only=True"):
        load_mom_official(src)
    assert not marker.exists()  # nothing ran
    torch.save([1, 2], tmp_path / "list.bin")  # plain data, but not a state dict
    with pytest.raises(ConversionError, match="does not hold a state dict"):
        load_pickled_state_dict(tmp_path / "list.bin")


# ---- config and key errors -------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model_type="gpt2"), "not the official MoM model_type 'gpt2-mot'"),
        (dict(use_ste=True), "use_ste=true is not supported"),
        (dict(routing_all_possible_path=True), "routing_all_possible_path=true"),
        (dict(router_type="gru_random_softmax"), "the 'random' variant"),
        (dict(router_type="gru_dev"), "the 'dev' variant"),
        (dict(router_type="linear"), "names neither a 'gru' nor a 'naive' router"),
        (dict(num_attn=1, num_ffn=1), "num_attn=1: the official code then runs one fixed"),
        (dict(num_attn=2, enable_pause=False), "num_attn=2 != num_ffn=3 needs enable_pause"),
        (dict(num_attn=4, router_type="naive"), "scores only num_ffn \\+ 1 choices"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings=false"),
        (dict(scale_attn_weights=False), "scale_attn_weights=false"),
        (dict(n_head=5), r"n_embd \(16\) must be divisible by n_head \(5\)"),
        (dict(activation_function="swish"), "activation_function 'swish' is unknown"),
    ],
)
def test_unrepresentable_config_names_the_field(overrides, message):
    with pytest.raises(ConversionError, match=message):
        official_config_to_mom(small_official_config(**overrides))


def test_config_mapping():
    cfg = official_config_to_mom(small_official_config(
        router_type="naive", routing_top_k=9, depth_per_chunk=None, depth_multiplier=1.5,
        chunks=2, require_anchor_layer=False, num_top_layers=1, enable_pause=False,
    ))  # fmt: skip
    assert cfg.chunks == "[1-3-3-1]" and cfg.router == "mlp"
    assert cfg.K == 3 and cfg.H == 4 and not cfg.skip  # K clamped to the 3 choices
    assert cfg.router_output == "logits" and not cfg.renormalize
    assert cfg.router_temperature == 1.0
    soft = official_config_to_mom(small_official_config(router_softmax_temperature=0.2))
    assert soft.router_output == "softmax" and soft.renormalize and soft.router_temperature == 0.2


def test_unknown_missing_and_misshapen_keys_are_named(tmp_path):
    hf = small_official_config()
    state = random_official(hf)
    extra = {**state, "transformer.h.1.mot_attn.extra.weight": torch.zeros(3)}
    with pytest.raises(ConversionError, match=r"transformer\.h\.1\.mot_attn\.extra\.weight"):
        load_mom_official(write_official(tmp_path / "extra", hf, extra))
    beyond = {**state, "transformer.h.1.mot_ffn.c_fc.3.bias": torch.zeros(24)}  # module 3 of 3
    with pytest.raises(ConversionError, match=r"mot_ffn\.c_fc\.3\.bias"):
        load_mom_official(write_official(tmp_path / "beyond", hf, beyond))
    for gone in (
        "transformer.h.1.mot_ffn.c_proj.2.weight",
        "transformer.h.1.mot_attn.router.h2h.bias",
        "transformer.h.2.mot_ffn.c_fc.weight",
        "transformer.wpe.weight",
    ):
        missing = {k: v for k, v in state.items() if k != gone}
        with pytest.raises(ConversionError, match=rf"1 official tensors are missing.*{gone}"):
            load_mom_official(write_official(tmp_path / gone, hf, missing))
    short = {**state, "transformer.h.0.mot_attn.c_attn.weight": torch.zeros(16, 47)}
    with pytest.raises(ConversionError, match=r"c_attn\.weight has shape \(16, 47\).*\(16, 48\)"):
        load_mom_official(write_official(tmp_path / "short", hf, short))
    untied = {**state, "lm_head.weight": state["transformer.wte.weight"] + 1}
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        load_mom_official(write_official(tmp_path / "untied", hf, untied))


# ---- official options without fixtures, against the plain re-implementation -----------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(router_type="gru"),  # raw logits as weights, possibly negative
        dict(router_type="naive_softmax", router_softmax_temperature=0.5, weighted_qkv=True),
        dict(router_type="naive"),
        dict(routing_top_k=1),  # all-SKIP tokens stay zero keys
        dict(routing_top_k=1, router_type="gru", weighted_qkv=True),
        dict(num_attn=2, num_ffn=4),  # chunk-wide routers: 5 choices, 2 are no module
        dict(num_attn=4, num_ffn=2, routing_top_k=1),
        dict(num_attn=2, num_ffn=3, router_type="naive_softmax"),
    ],
)
def test_official_options_match_the_plain_reimplementation(tmp_path, overrides):
    torch.set_num_threads(1)
    hf = small_official_config(**overrides)
    state = random_official(hf, seed=1, skip_bias=0.5)
    model = load_mom_official(write_official(tmp_path / "m", hf, state))
    ids = torch.randint(0, hf["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model(ids, return_routing=True)
        padded = model(ids, attention_mask=mask).logits
    state64 = {k: v.double() for k, v in state.items()}  # the reference in fp64
    ref = official_logits(hf, state64, ids).float()
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=1e-4)
    real = mask.bool()
    torch.testing.assert_close(
        padded[real], official_logits(hf, state64, ids, mask)[real].float(), atol=1e-4, rtol=1e-4
    )
    if hf["routing_top_k"] == 1:  # some tokens really did skip a whole attention step
        assert any((~r.attn.picks_module()).all(-1).any() for r in out.routing)
    if hf["num_attn"] != hf["num_ffn"]:
        chunk = model.transformer.chunks[0]
        assert (chunk.attn.num_modules, chunk.ffn.num_modules) == (hf["num_attn"], hf["num_ffn"])
        assert model.config.router_width == "chunk"
    if "softmax" not in hf["router_type"]:
        # raw logits as weights: unnormalised (and negative in places for these weights)
        weights = torch.cat(
            [torch.cat([r.attn.weights, r.ffn.weights]).flatten() for r in out.routing]
        )
        assert not torch.allclose(weights, torch.ones(()).expand_as(weights))


# ---- the options in modformer itself ---------------------------------------------------


def small_mom(**kw) -> MoMForCausalLM:
    torch.manual_seed(0)
    cfg = MoMConfig(
        vocab_size=41, n_positions=32, n_embd=16, n_head=2, router_dim=8, chunks="[1-3-1]", **kw
    )
    model = MoMForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name or "wte" in name or "wpe" in name:
                p.normal_(0.0, 1.0)
            elif "bias" in name:
                p.normal_(0.0, 0.3)
        if cfg.skip and cfg.policy == "learned":
            for chunk in model.transformer.chunks:
                chunk.policy.attn_router.out.bias[-1] += 0.5
    return model.eval()


def test_top_k_routing_temperature_and_raw_logits():
    logits = torch.randn(7, 5)
    w, i, probs = top_k_routing(logits, 2, renormalize=True, temperature=0.2)
    torch.testing.assert_close(probs, torch.softmax(logits / 0.2, -1))
    ref_w, ref_i = probs.topk(2, -1)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w, ref_w / ref_w.sum(-1, keepdim=True))
    raw, raw_i, _ = top_k_routing(logits, 2, renormalize=False, output="logits")
    assert torch.equal(raw_i, ref_i) and torch.equal(raw, logits.topk(2, -1).values)
    with pytest.raises(ValueError, match="neither renormalize nor temperature"):
        top_k_routing(logits, 2, renormalize=True, output="logits")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(router_temperature=0.0), "router_temperature must be > 0"),
        (dict(router_output="tanh"), "router_output 'tanh' is unknown"),
        (dict(router_output="logits"), "set renormalize=False and router_temperature=1.0"),
        (
            dict(router_output="logits", renormalize=False, router_temperature=0.5),
            "set renormalize=False",
        ),
        (dict(all_skip_tokens="keep"), "all_skip_tokens 'keep' is unknown"),
        (dict(router_width="wide"), "router_width 'wide' is unknown"),
        (dict(router_width="chunk", skip=False), "router_width='chunk' .* needs the learned"),
        (dict(router_width="chunk", policy="vanilla", H=3), "needs the learned policy"),
        (dict(router_width="chunk", attn_modules_per_chunk=[4]), "at most N modules per pool"),
    ],
)
def test_option_validation(kwargs, message):
    with pytest.raises(Exception, match=message):
        MoMConfig(chunks="[1-3-1]", **kwargs)


@torch.no_grad()
def zero_key_reference(model: MoMForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """K = 1 with SKIP, all-SKIP tokens kept as zero keys, written out plainly: per step,
    q/k/v = the picked module's projection or 0, full causal softmax attention, output
    r * W^O of the picked module or 0."""
    cfg, tr = model.config, model.transformer
    B, T = ids.shape
    x = tr.wte(ids) + tr.wpe(torch.arange(T))[None]
    for entry in tr.h:
        if not hasattr(entry, "policy"):
            x = entry(x)
            continue
        pool, state = entry.attn, entry.policy.begin({})
        for h in range(cfg.H):
            sel = entry.policy.attention(h, x.reshape(B * T, -1), state)
            pick, weight = sel.indices.view(B, T), sel.weights.view(B, T)
            qkv = torch.zeros(B, T, 3 * cfg.n_embd)
            for b in range(B):
                for t in range(T):
                    m = int(pick[b, t])
                    if m < pool.num_modules:
                        ln = F.layer_norm(
                            x[b, t], (cfg.n_embd,), pool.ln_weight[m], pool.ln_bias[m]
                        )
                        qkv[b, t] = ln @ pool.qkv_weight[m] + pool.qkv_bias[m]
            q, k, v = qkv.split(cfg.n_embd, -1)
            heads = _attention(q, k, v, cfg.n_head, torch.zeros(B, 1, 1, T))
            out = torch.zeros_like(x)
            for b in range(B):
                for t in range(T):
                    m = int(pick[b, t])
                    if m < pool.num_modules:
                        out[b, t] = weight[b, t] * (
                            heads[b, t] @ pool.proj_weight[m] + pool.proj_bias[m]
                        )
            x = x + out
            u = x.reshape(B * T, -1)
            sel = entry.policy.ffn(h, u, state)
            x = x + entry.ffn(
                x,
                entry._pairs(sel, entry.ffn),
                entry.ffn.fc_projection(),
            )
    return model.lm_head(tr.ln_f(x))


def test_zero_key_all_skip_tokens_match_a_plain_reference():
    model = small_mom(K=1, H=3, skip=True, all_skip_tokens="zero_key")
    assert not model.config.attention_may_skip_all
    assert model.config.num_hidden_layers == 2 + 3  # no key-flag cache layers
    ids = torch.randint(0, 41, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, return_routing=True)
    all_skip = torch.stack([(~r.attn.picks_module()).all(-1) for r in out.routing])
    assert all_skip.any() and not all_skip.all()
    torch.testing.assert_close(out.logits, zero_key_reference(model, ids), atol=1e-4, rtol=1e-4)
    dropped = small_mom(K=1, H=3, skip=True)  # same weights, the default "drop"
    with torch.no_grad():
        assert (dropped(ids).logits - out.logits).abs().max() > 1e-2


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(K=1, H=3, skip=True, all_skip_tokens="zero_key"),
        dict(K=2, H=3, skip=True, router_temperature=0.3),
        dict(K=2, H=2, skip=True, router_output="logits", renormalize=False, router="mlp"),
        dict(policy="early_exit", H=3, skip_layers=[2], all_skip_tokens="zero_key"),
        # 3 router choices + SKIP over a pool of 2: K=2 may pick no module at all (dropped)
        dict(K=2, H=3, attn_modules_per_chunk=[2], router_width="chunk"),
    ],
)
def test_options_cached_and_uncached_generation_agree(kwargs):
    torch.set_num_threads(1)
    model = small_mom(**kwargs)
    prompt = torch.randint(0, 41, (2, 5), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    cached = model.generate(prompt, use_cache=True, **gen)
    uncached = model.generate(prompt, use_cache=False, **gen)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(K=1, H=3, all_skip_tokens="zero_key"),
        dict(K=2, H=3, router_temperature=0.3),
        dict(K=2, H=2, router_output="logits", renormalize=False),
        dict(K=2, H=2, ffn_modules_per_chunk=[2], router_width="chunk"),
    ],
)
def test_options_train(kwargs):
    torch.set_num_threads(1)
    model = small_mom(balance_loss_weight=0.01, **kwargs).train()
    ids = torch.randint(0, 41, (2, 12), generator=torch.Generator().manual_seed(2))
    out = model(ids, labels=ids)
    out.loss.backward()
    router = model.transformer.chunks[0].policy.attn_router.out.weight
    assert torch.isfinite(out.loss) and router.grad is not None and router.grad.abs().sum() > 0


def test_zero_keys_count_in_attention_costs():
    """H = 1: both models route the chunk's one attention step alike; with zero keys its
    queries also score the all-SKIP tokens before them."""
    ids = torch.randint(0, 41, (2, 12), generator=torch.Generator().manual_seed(3))
    zero_key = small_mom(K=1, H=1, all_skip_tokens="zero_key")
    dropped = inference_flops(small_mom(K=1, H=1), ids).components["attention_scores"]
    kept = inference_flops(zero_key, ids).components["attention_scores"]
    with torch.no_grad():
        (step,) = zero_key(ids, return_routing=True).routing
    query = step.attn.picks_module().any(-1)
    assert query.any() and not query.all()
    extra_keys = ((~query).long().cumsum(1) * query).sum()  # earlier all-SKIP keys per query
    assert kept - dropped == int(extra_keys) * 4 * 16  # 2 * 2 FLOPs per key and width


def test_chunk_wide_routers():
    """Choices beyond a smaller pool run no module, count as that pool's SKIP in the
    routing trace, take their share of the weights, and keep the router's own width."""
    model = small_mom(K=2, H=3, attn_modules_per_chunk=[2], router_width="chunk")
    policy = model.transformer.chunks[0].policy
    assert policy.attn_router.out.out_features == policy.ffn_router.out.out_features == 4
    assert model.config.attention_may_skip_all  # choice 2 + SKIP: no module at all
    ids = torch.randint(0, 41, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        trace = model(ids, return_routing=True).routing
    for step in trace:
        assert step.attn.indices.max() <= 2 and step.ffn.indices.max() <= 3  # 2 / 3 = SKIP
        torch.testing.assert_close(step.attn.weights.sum(-1), torch.ones(2, 12))
    assert any((s.attn.indices == 2).all(-1).any() for s in trace)
    with pytest.raises(Exception, match="pruning needs router_width='pool'"):
        prune_model(model, {"chunk0/attn": torch.ones(2), "chunk0/ffn": torch.ones(3)}, 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(router_temperature=0.3),
        dict(router_output="logits", renormalize=False),
        dict(K=1, all_skip_tokens="zero_key"),
    ],
)
def test_pruning_never_used_modules_keeps_logits_with_the_options(kwargs):
    model = small_mom(H=2, **{"K": 2, **kwargs})
    with torch.no_grad():
        for chunk in model.transformer.chunks:
            chunk.policy.attn_router.out.bias[1] = -1e4  # attention module 1: never picked
    batches = [torch.randint(0, 41, (2, 16), generator=torch.Generator().manual_seed(5))]
    pruned, report = prune_model(model, collect_usage(model, batches), threshold=1e-6)
    assert pruned.config.attn_modules_per_chunk == [2]
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(batches[0]).logits, model(batches[0]).logits, atol=1e-6, rtol=0
        )
