"""torch.compile of every architecture (0 graph breaks, compiled training step == eager) and
activation checkpointing (loss, gradients, aux losses and routing unchanged)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from modformer.models.gpt import GPTConfig, GPTForCausalLM
from modformer.models.moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM
from modformer.models.mom import MoMConfig, MoMForCausalLM
from modformer.models.outputs import output_cache
from modformer.nn.experts import experts_backend
from modformer.nn.grouped import grouped_linear, make_dispatch

VOCAB = 61


def tiny_config(arch: str, **kw):
    """Tiny models of each architecture; the MoM variants cover SKIP (with K=1 a token can
    skip a whole attention step, which masks it out of the keys) and the balance loss."""
    if arch == "gpt":
        return GPTConfig(
            **{
                "vocab_size": VOCAB,
                "n_positions": 32,
                "n_embd": 32,
                "n_head": 4,
                "n_layer": 2,
                **kw,
            }
        )
    if arch.startswith("mom"):
        base = dict(
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=32,
            n_head=4,
            router_dim=16,
            chunks="[2]",  # one chunk, no fixed blocks (the GPT case covers those)
            balance_loss_weight=0.01,
        )
        if arch == "mom_skip":
            base.update(skip=True, K=1)
        return MoMConfig(**{**base, **kw})
    if arch == "moduleformer":
        base = dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=1,
            n_att_experts=4,
            att_hidden=32,
            n_head=2,
            k_att=2,
            n_ffd_experts=4,
            ffd_hidden=64,
            k_ffd=2,
            router_hidden=16,
            n_positions=32,
            attention_block_size=8,  # two stick-breaking blocks at T = 16
        )
        return ModuleFormerConfig(**{**base, **kw})
    raise ValueError(arch)


MODEL_CLASSES = {"gpt": GPTForCausalLM, "moduleformer": ModuleFormerForCausalLM}
ARCHS = ["gpt", "mom", "mom_skip", "moduleformer"]


@torch.no_grad()
def spread_out(model: torch.nn.Module) -> torch.nn.Module:
    """Large router weights and embeddings: routers pick different modules per token (and
    SKIP for some), so a wrong gradient or routing path shows."""
    for name, p in model.named_parameters():
        if "router" in name or "wte" in name or "wpe" in name:
            p.normal_(0.0, 1.0)
    return model


def make_model(arch: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = MODEL_CLASSES.get(arch, MoMForCausalLM)
    return spread_out(cls(tiny_config(arch, **kw))).train()


def batch(seed: int = 1, B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def training_loss(model, x, autocast_dtype=None):
    with torch.autocast(
        "cpu", dtype=autocast_dtype or torch.bfloat16, enabled=bool(autocast_dtype)
    ):
        return model(input_ids=x, labels=x, use_cache=False).loss


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- torch.compile ----------------------------------------------------------------------


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_has_no_graph_breaks(arch, autocast_dtype):
    model = make_model(arch)
    x = batch()
    dynamo.reset()
    explanation = dynamo.explain(lambda x: training_loss(model, x, autocast_dtype))(x)
    dynamo.reset()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("arch", ["mom_skip", "moduleformer"])
def test_loop_experts_backend_has_no_graph_breaks(arch):
    """The loop backend loops over experts in Python, never over tokens, and reads nothing
    back to the host: one graph too."""
    model = make_model(arch)
    x = batch()
    dynamo.reset()
    with experts_backend("loop"):
        explanation = dynamo.explain(lambda x: training_loss(model, x))(x)
    dynamo.reset()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("arch", ["mom_skip", "moduleformer"])
def test_padded_eval_forward_has_no_graph_breaks(arch):
    model = make_model(arch).eval()
    x = batch()
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding
    dynamo.reset()
    with torch.no_grad():
        explanation = dynamo.explain(
            lambda x: model(input_ids=x, attention_mask=mask, use_cache=False).logits
        )(x)
    dynamo.reset()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def _compiled_step_matches_eager(
    arch: str, backend: str, autocast_dtype=None, tol=1e-4, checkpointing: bool = False
):
    model = make_model(arch)
    if checkpointing:
        model.activation_checkpointing_enable()
    x = batch()
    eager_loss = training_loss(model, x, autocast_dtype)
    eager_loss.backward()
    eager_grads = grads(model)
    model.zero_grad(set_to_none=True)

    dynamo.reset()
    # fullgraph: a graph break anywhere (forward or the traced backward) is an error.
    compiled = torch.compile(
        lambda x: training_loss(model, x, autocast_dtype),
        backend=backend,
        dynamic=False,
        fullgraph=True,
    )
    compiled_loss = compiled(x)
    compiled_loss.backward()
    compiled_grads = grads(model)
    dynamo.reset()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=tol, rtol=tol)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(
            compiled_grads[name], eager_grads[name], atol=tol, rtol=tol, msg=name
        )


@pytest.mark.parametrize(
    "arch", ["gpt", "mom", pytest.param("mom_skip", marks=pytest.mark.slow), "moduleformer"]
)
def test_compiled_training_step_matches_eager_aot(arch):
    """The compile front end (dynamo + AOT autograd over fake tensors, our custom ops'
    fake implementations and backward), without inductor's slow code generation."""
    _compiled_step_matches_eager(arch, "aot_eager")


def test_compiled_loop_experts_training_step_matches_eager_aot():
    with experts_backend("loop"):
        _compiled_step_matches_eager("moduleformer", "aot_eager")


@pytest.mark.parametrize("arch", [pytest.param("mom", marks=pytest.mark.slow), "moduleformer"])
def test_compiled_checkpointed_training_step_matches_eager(arch):
    """Compile and activation checkpointing together: one graph, the same gradients."""
    _compiled_step_matches_eager(arch, "aot_eager", checkpointing=True)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_training_step_matches_eager_inductor(arch):
    _compiled_step_matches_eager(arch, "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mom", "moduleformer"])
def test_compiled_bf16_training_step_matches_eager_inductor(arch):
    # bf16 products: inductor may fuse and round differently from eager.
    _compiled_step_matches_eager(arch, "inductor", torch.bfloat16, tol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_linear_custom_op_compiles_with_left_out_rows(dtype):
    """fp32 runs grouped_mm, fp64 the per-group loop; both behind the same custom op."""
    torch.manual_seed(0)
    x = torch.randn(20, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 8, 16, dtype=dtype, requires_grad=True)
    index = torch.randint(0, 4, (20, 1))  # 3 = left out
    dispatch = make_dispatch(index, 3)

    def f(x, w):
        return grouped_linear(x[dispatch.token_index], w, dispatch.offsets)

    eager = f(x, w)
    g = torch.randn_like(eager)
    eager_grads = torch.autograd.grad(eager, (x, w), g)
    dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=False)(x, w)
    compiled_grads = torch.autograd.grad(compiled, (x, w), g)
    dynamo.reset()
    torch.testing.assert_close(compiled, eager)
    left_out = int(dispatch.offsets[-1])
    assert torch.all(compiled[left_out:] == 0)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_grouped_mm_op_passes_opcheck():
    """torch.library's own checks of the custom op: fake tensor, autograd registration."""
    torch.manual_seed(0)
    x = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)
    torch.library.opcheck(torch.ops.modformer.grouped_mm.default, (x, w, offsets, True))
    grad_y = torch.randn(12, 8)
    torch.library.opcheck(
        torch.ops.modformer.grouped_mm_weight_grad.default, (x.detach(), grad_y, offsets)
    )


# ---- activation checkpointing -----------------------------------------------------------


def _run(model, x, **call):
    out = model(input_ids=x, labels=x, use_cache=False, **call)
    out.loss.backward()
    return out, grads(model)


CHECKPOINT_CASES = {
    "gpt": {"dropout": 0.1},
    "mom": {"dropout": 0.1},
    "mom_skip": {"dropout": 0.1},
    "mom_mlp_router": {"dropout": 0.1, "router": "mlp"},
    "moduleformer": {"dropout": 0.1},
    "moduleformer_switch": {"dropout": 0.1, "aux_loss_type": "switch"},
}


def _case_arch(case: str) -> str:
    return {"mom_mlp_router": "mom", "moduleformer_switch": "moduleformer"}.get(case, case)


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_activation_checkpointing_keeps_loss_gradients_and_routing(case):
    """Dropout is on: equal gradients need the recomputation to replay the same masks. Aux
    losses and metrics must come out once, with the values of the plain run."""
    arch, overrides = _case_arch(case), CHECKPOINT_CASES[case]
    x = batch()
    call = {"return_routing": True} if arch.startswith("mom") else {}

    plain = make_model(arch, **overrides)
    torch.manual_seed(5)
    out_plain, grads_plain = _run(plain, x, **call)

    checkpointed = make_model(arch, **overrides)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.is_activation_checkpointing
    torch.manual_seed(5)
    out_ckpt, grads_ckpt = _run(checkpointed, x, **call)

    torch.testing.assert_close(out_ckpt.loss, out_plain.loss, atol=1e-5, rtol=1e-5)
    if out_plain.aux_loss is not None:
        torch.testing.assert_close(out_ckpt.aux_loss, out_plain.aux_loss, atol=1e-5, rtol=1e-5)
    assert (out_plain.aux_metrics or {}).keys() == (out_ckpt.aux_metrics or {}).keys()
    for name, value in (out_plain.aux_metrics or {}).items():
        torch.testing.assert_close(out_ckpt.aux_metrics[name], value, atol=1e-5, rtol=1e-5)
    if arch.startswith("mom"):
        assert out_plain.aux_loss is not None  # the balance loss is on in these configs
        assert len(out_ckpt.routing) == len(out_plain.routing)
        for a, b in zip(out_ckpt.routing, out_plain.routing):
            assert torch.equal(a.attn.indices, b.attn.indices)
            assert torch.equal(a.ffn.indices, b.ffn.indices)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_carries_early_exit_flags_between_chunks():
    """Early exit hands per-token "exited" flags from chunk to chunk; a recomputed chunk
    must start from the flags it saw in the forward, not from the last chunk's."""
    overrides = dict(
        chunks="[1-2-2-1]", H=2, policy="early_exit", balance_loss_weight=0.0, dropout=0.1
    )

    def criterion(layer, hidden):
        return hidden[:, 0] > 0.0 if layer == 2 else torch.zeros_like(hidden[:, 0], dtype=bool)

    x = batch()
    results = []
    for enable in (False, True):
        model = make_model("mom", **overrides)
        model.set_skip_criterion(criterion)
        if enable:
            model.activation_checkpointing_enable()
        torch.manual_seed(5)
        results.append(_run(model, x, return_routing=True))
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = results
    skipped = ~out_plain.routing[-1].attn.picks_module()
    assert skipped.any() and not skipped.all()  # the flags differ between tokens
    torch.testing.assert_close(out_ckpt.loss, out_plain.loss, atol=1e-5, rtol=1e-5)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-5, rtol=1e-5)


def _saved_bytes(model, x) -> int:
    """Bytes of the tensors autograd keeps for the backward of one training forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
    return total


@pytest.mark.parametrize("arch", ["gpt", "mom", "moduleformer"])
def test_activation_checkpointing_saves_fewer_activations(arch):
    x = batch(T=32)
    plain = _saved_bytes(make_model(arch), x)
    model = make_model(arch)
    model.activation_checkpointing_enable()
    checkpointed = _saved_bytes(model, x)
    # Checkpointed layers keep their inputs only (the recomputed ones are counted as well,
    # but freed layer by layer in the real backward): the forward keeps much less.
    assert checkpointed < plain


@pytest.mark.allow_deprecations
def test_gradient_checkpointing_enable_alias_works():
    model = make_model("moduleformer")
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    model.gradient_checkpointing_disable()
    assert not any(block.gradient_checkpointing for block in model.transformer.h)


def test_reentrant_checkpointing_is_refused():
    model = make_model("mom")
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(ValueError, match="preserve_rng_state"):
        model.activation_checkpointing_enable({"preserve_rng_state": False})


def test_checkpointing_turns_the_kv_cache_off_in_training():
    model = make_model("gpt")
    model.activation_checkpointing_enable()
    x = batch()
    out = model(input_ids=x, labels=x, use_cache=True)
    out.loss.backward()  # a cache written twice by the recomputation would fail here
    assert output_cache(out) is None
    model.eval()
    with torch.no_grad():  # not training: caching works as usual
        assert model(input_ids=x, use_cache=True).logits.shape == (2, 16, VOCAB)


# ---- trainer options --------------------------------------------------------------------

TRAINER_MODELS = {
    "gpt": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64},
    "mom": {"n_embd": 32, "n_head": 2, "n_positions": 64, "router_dim": 16, "dropout": 0.1},
    "moduleformer": {"n_embd": 32, "n_layer": 2, "att_hidden": 32, "ffd_hidden": 64},
}


def _train_losses(data_dir, out_dir, arch: str, **options) -> list[float]:
    import json

    from modformer.train.config import load_train_config
    from modformer.train.trainer import train

    overrides = [
        f"data.dir={data_dir}",
        "data.block_size=32",
        f"out_dir={out_dir}",
        "max_steps=4",
        "batch_size=2",
        "eval_batches=1",
        "eval_interval=0",
        "log_interval=1",
        "progress=false",
        "threads=1",
        "optim.warmup_steps=1",
        f"model.arch={arch}",
        f"model.overrides={json.dumps(TRAINER_MODELS[arch])}",
    ] + [f"{k}={v}" for k, v in options.items()]
    final = train(load_train_config(None, overrides))
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r] + [final["val_loss"]]


@pytest.mark.parametrize("arch", ["mom", "moduleformer"])
def test_trainer_activation_checkpointing_gives_the_same_run(
    tiny_data_dir, tmp_path, monkeypatch, arch
):
    import transformers.modeling_utils as hf_modeling

    recomputed = []
    original = hf_modeling.checkpoint

    def counting_checkpoint(*args, **kwargs):
        recomputed.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_modeling, "checkpoint", counting_checkpoint)
    plain = _train_losses(tiny_data_dir, tmp_path / "plain", arch)
    assert not recomputed
    checkpointed = _train_losses(
        tiny_data_dir, tmp_path / "ckpt", arch, activation_checkpointing="true"
    )
    # 4 steps x checkpointed layers: [1-2-1] has 2 fixed blocks and 1 chunk; 2 ModuleFormer blocks
    assert len(recomputed) == 4 * (3 if arch == "mom" else 2)
    assert len(plain) == 5
    torch.testing.assert_close(checkpointed, plain, atol=1e-5, rtol=1e-5)


def test_trainer_compile_option_compiles_the_model(tiny_data_dir, tmp_path, monkeypatch):
    """`compile=true` compiles the model (here with the aot_eager backend, to keep the test
    fast) and trains exactly as eager."""
    compiled = []
    original = torch.nn.Module.compile

    def compile_aot_eager(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        return original(module, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_aot_eager)
    eager = _train_losses(tiny_data_dir, tmp_path / "eager", "gpt")
    assert compiled == []
    dynamo.reset()
    with_compile = _train_losses(tiny_data_dir, tmp_path / "compiled", "gpt", compile="true")
    dynamo.reset()
    assert compiled == ["GPTForCausalLM"]
    torch.testing.assert_close(with_compile, eager, atol=1e-4, rtol=1e-4)
