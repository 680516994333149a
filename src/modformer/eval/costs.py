"""Inference costs of any modformer model (design §2 "Costs", MoM paper Table 1): parameters
(total and active), FLOPs per token counting only the modules each token actually runs,
and measured peak memory; `modformer cost` prints them side by side.

FLOP conventions (`inference_flops`): see `modformer.models.flops`; each model
family's `count_flops` follows them.

Memory (`peak_memory`): one no-grad inference forward (no KV cache). On CUDA the
allocator's ``max_memory_allocated``; elsewhere the peak of the bytes of all tensor
storages alive during the forward (`peak_tensor_bytes`), which is exact for tensors but
does not see buffers a kernel allocates outside PyTorch (MKL/oneDNN workspaces).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import PreTrainedConfig, PreTrainedModel

from modformer.defaults import SPEC_SYNTAX
from modformer.models.flops import (  # noqa: F401  (FlopReport, COMPONENTS: re-exported)
    ATTENTION_MODES,
    COMPONENTS,
    FlopReport,
    total_parameters,
)
from modformer.models.gpt.modeling_gpt import GPTForCausalLM
from modformer.models.moduleformer.modeling_moduleformer import ModuleFormerForCausalLM
from modformer.models.mom.modeling_mom import MoMForCausalLM

SUPPORTED_MODELS = (GPTForCausalLM, MoMForCausalLM, ModuleFormerForCausalLM)


# ---- FLOPs -----------------------------------------------------------------------------


def _check_model(model: nn.Module) -> None:
    if not callable(getattr(model, "count_flops", None)):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_MODELS)
        raise ValueError(f"cost accounting supports {names}; got {type(model).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def inference_flops(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    attention: str = "causal",
) -> FlopReport:
    """Analytic FLOPs of one inference forward of `model` on `input_ids` (B, T).

    Runs the model once (no grad, eval mode, no KV cache) for its routing decisions and
    counts, per component, the matmul FLOPs of the modules each real token ran; see the
    module docstring for the conventions (1 multiply-add = 2 FLOPs, matmuls only,
    padding not counted, `attention` "causal" or "dense"). Reads the counts back to the
    host: a measurement tool, not something to call inside a training step.
    """
    _check_model(model)
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be a (batch, seq_len) tensor of token ids, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    device = _model_device(model)
    input_ids = input_ids.to(device)
    if attention_mask is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; pass one 0/1 entry per token"
            )
        attention_mask = attention_mask.to(device)
        real = attention_mask.bool()
        if not real.any():
            raise ValueError("attention_mask marks no real token: nothing to count")

    was_training = model.training
    model.eval()
    try:
        return model.count_flops(input_ids, attention_mask, real, attention)
    finally:
        model.train(was_training)


def flops_per_token(
    model: PreTrainedModel,
    batch: torch.Tensor | Mapping[str, torch.Tensor],
    attention: str = "causal",
) -> float:
    """Inference FLOPs per real token of `batch`: a (B, T) id tensor, or a mapping with
    ``input_ids`` (and optionally ``attention_mask``)."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"batch has no 'input_ids' (keys: {sorted(batch)})")
        return inference_flops(
            model, batch["input_ids"], batch.get("attention_mask"), attention
        ).per_token
    return inference_flops(model, batch, attention=attention).per_token


# ---- cross-check with torch's FLOP counter -------------------------------------------


def _grouped_mm_flops(a, b, offs=None, bias=None, out_dtype=None, *, out_val=None) -> int:
    """`aten._grouped_mm`: only the rows inside the groups' offsets are computed."""
    if a.dim() == 2 and b.dim() == 3:  # (rows, K) x (G, K, N), groups along the rows
        return 2 * int(offs[-1]) * a.shape[1] * b.shape[2]
    if a.dim() == 2 and b.dim() == 2:  # (M, K) x (K, N), groups along K (weight gradients)
        return 2 * a.shape[0] * b.shape[1] * int(offs[-1])
    if a.dim() == 3 and b.dim() == 2:  # (G, M, K) x (K, N), groups along N
        return 2 * a.shape[1] * a.shape[2] * int(offs[-1])
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]  # batched (G, M, K) x (G, K, N)


_grouped_mm_flops._get_raw = True  # FlopCounterMode passes tensors (for offs), not shapes


def _grouped_mm_op_flops(x, weight, offsets, zero_left_out=True, *, out_val=None) -> int:
    """`modformer::grouped_mm` (nn/grouped.py), whichever kernel runs inside it."""
    return _grouped_mm_flops(x, weight, offsets)


def _grouped_mm_weight_grad_flops(x, grad_y, offsets, *, out_val=None) -> int:
    """`modformer::grouped_mm_weight_grad`: (K, rows) x (rows, N) per group."""
    return 2 * x.shape[1] * grad_y.shape[1] * int(offsets[-1])


_grouped_mm_op_flops._get_raw = True
_grouped_mm_weight_grad_flops._get_raw = True


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU flash SDPA kernel: dense, like torch's formula for the CUDA kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Ops FlopCounterMode has no formula for in torch 2.x (it would count them as 0).
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._grouped_mm: _grouped_mm_flops,
    torch.ops.modformer.grouped_mm: _grouped_mm_op_flops,
    torch.ops.modformer.grouped_mm_weight_grad: _grouped_mm_weight_grad_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
}


@torch.no_grad()
def count_flops_with_torch(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[str, int]:
    """FLOPs of one no-grad forward as `torch.utils.flop_counter.FlopCounterMode` counts
    them, by op (``{"aten.mm": ..., "modformer.grouped_mm": ...}``), with formulas added
    for grouped GEMMs and the CPU SDPA kernel. Dense attention, every computed matmul
    (including implementation overheads): the cross-check for `inference_flops`."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    mask = None if attention_mask is None else attention_mask.to(device)
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
            model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
    finally:
        model.train(was_training)
    return {str(op): int(flops) for op, flops in counter.get_flop_counts()["Global"].items()}


# ---- memory ----------------------------------------------------------------------------


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created under the mode that are still alive.

    An op's outputs whose storage is not one of its inputs' (views and in-place results
    share their input's) are new allocations; a weak reference on the storage subtracts
    its bytes when it is freed. `peak` is the high-water mark.
    """

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


def peak_tensor_bytes(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes of the tensors on `device` that `fn()` allocates and holds at once.

    Exact for PyTorch tensors (counted at storage granularity, before any allocator
    rounding); memory a kernel takes outside PyTorch's tensors is not seen. The result
    of `fn` is dropped before returning, so it counts towards the peak only.
    """
    tracker = _LiveTensorBytes(torch.device(device).type)
    with tracker:
        fn()
    return tracker.peak


@dataclass
class MemoryReport:
    """Peak memory of one inference forward.

    peak_bytes: total at the peak (parameters, buffers, inputs and activations);
    parameter_bytes: parameters and buffers; activation_bytes: the peak above what was
    allocated before the forward; method: "cuda allocator" or "live tensors".
    """

    peak_bytes: int
    parameter_bytes: int
    activation_bytes: int
    method: str


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


@torch.no_grad()
def peak_memory(
    model: PreTrainedModel,
    batch_size: int,
    seq_len: int,
    device: str | torch.device = "cpu",
    method: str = "auto",
    seed: int = 0,
) -> MemoryReport:
    """Measured peak memory of one no-grad forward (no KV cache) on random token ids.

    The model is moved to `device`. method: "allocator" (CUDA only:
    ``torch.cuda.max_memory_allocated`` after a warm-up forward and a reset), "tensors"
    (`peak_tensor_bytes`, any device) or "auto" (the allocator on CUDA, else tensors).
    """
    _check_model(model)
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    device = torch.device(device)
    if method == "auto":
        method = "allocator" if device.type == "cuda" else "tensors"
    if method not in ("allocator", "tensors"):
        raise ValueError(f"method must be 'auto', 'allocator' or 'tensors', got {method!r}")
    if method == "allocator" and device.type != "cuda":
        raise ValueError(f"method 'allocator' needs a CUDA device, got {device}; use 'tensors'")
    model.to(device)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(
        0, model.config.vocab_size, (batch_size, seq_len), generator=generator
    )
    input_ids = input_ids.to(device)
    parameter_bytes = _storage_bytes([*model.parameters(), *model.buffers()])

    def forward() -> None:
        model(input_ids=input_ids, use_cache=False)

    try:
        if method == "allocator":
            forward()  # warm-up: library workspaces are allocated once, not per forward
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            forward()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            return MemoryReport(peak, parameter_bytes, peak - before, "cuda allocator")
        activations = peak_tensor_bytes(forward, device)
        before = parameter_bytes + _storage_bytes([input_ids])
        return MemoryReport(before + activations, parameter_bytes, activations, "live tensors")
    finally:
        model.train(was_training)


# ---- the cost table --------------------------------------------------------------------


@dataclass
class CostRow:
    """One line of the cost table. flops_vs_first / memory_vs_first: relative change
    against the table's first row (0.195 = +19.5%). val_loss: None unless data was given
    and the entry is a trained model."""

    name: str
    parameters: int
    active_parameters: int
    flops_per_token: float
    peak_memory_bytes: int
    activation_memory_bytes: int
    trained: bool
    flops_components: dict[str, float] = field(default_factory=dict)
    memory_method: str = ""
    tokens: int = 0
    val_loss: float | None = None
    flops_vs_first: float = 0.0
    memory_vs_first: float = 0.0


def _first_val_batch(data_dir: str | Path, seq_len: int, batch_size: int) -> torch.Tensor:
    from modformer.data.dataset import TokenDataset

    batch = next(iter(TokenDataset(data_dir, "val").iter_sequential(seq_len, batch_size)), None)
    if batch is None:
        raise ValueError(
            f"the val split of {data_dir} holds no window of {seq_len} tokens; lower --seq-len"
        )
    return batch


def _build_random_init(config: PreTrainedConfig, seed: int) -> PreTrainedModel:
    from modformer.models.registry import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(config)


def cost_table(
    configs: Sequence[tuple[str, PreTrainedModel | PreTrainedConfig]],
    batch_size: int,
    seq_len: int,
    data_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    attention: str = "causal",
    max_val_batches: int | None = None,
    seed: int = 0,
) -> list[CostRow]:
    """Costs of each (name, model or config) at batch_size x seq_len, as Table 1 rows.

    A config gets a random-init model (seeded: every config starts from the same seed);
    its routers are untrained, so MoM/ModuleFormer FLOPs follow whatever the fresh
    routers pick, and learned routing will change them. A model is treated as trained:
    with `data_dir` its val loss (windows of seq_len) is reported. FLOPs are counted on
    the first val batch of `data_dir` (routing on real text) or, without data, on
    uniformly random token ids. Each model is on `device` only while it is measured.
    """
    if not configs:
        raise ValueError("cost_table needs at least one (name, model or config) entry")
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
    data_batch = None if data_dir is None else _first_val_batch(data_dir, seq_len, batch_size)
    rows: list[CostRow] = []
    for name, entry in configs:
        trained = isinstance(entry, PreTrainedModel)
        if trained:
            model = entry
        elif isinstance(entry, PreTrainedConfig):
            model = _build_random_init(entry, seed)
        else:
            raise ValueError(
                f"entry {name!r} is a {type(entry).__name__}; pass a model or a config"
            )
        _check_model(model)
        home = _model_device(model)
        try:
            rows.append(
                _cost_row(
                    name, model, trained, data_batch, data_dir, batch_size, seq_len, device,
                    attention, max_val_batches, seed,
                )
            )  # fmt: skip
        finally:
            model.to(home)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    base = rows[0]
    for row in rows:
        row.flops_vs_first = row.flops_per_token / base.flops_per_token - 1.0
        row.memory_vs_first = row.peak_memory_bytes / base.peak_memory_bytes - 1.0
    return rows


def _cost_row(
    name: str,
    model: PreTrainedModel,
    trained: bool,
    data_batch: torch.Tensor | None,
    data_dir: str | Path | None,
    batch_size: int,
    seq_len: int,
    device: str | torch.device,
    attention: str,
    max_val_batches: int | None,
    seed: int,
) -> CostRow:
    vocab_size = model.config.vocab_size
    if data_batch is not None:
        if int(data_batch.max()) >= vocab_size:
            raise ValueError(
                f"{name}: the data holds token ids up to {int(data_batch.max())} but the model's "
                f"vocab_size is {vocab_size}; build it with a larger vocab_size"
            )
        tokens = data_batch
    else:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    model.to(device)
    flops = inference_flops(model, tokens, attention=attention)
    memory = peak_memory(model, batch_size, seq_len, device, seed=seed)
    val_loss = None
    if trained and data_dir is not None:
        from modformer.eval.lm import evaluate_split

        results = evaluate_split(
            model, str(data_dir), "val", seq_len, batch_size, max_val_batches, device=str(device)
        )
        val_loss = results["all"]["loss"]
    return CostRow(
        name=name,
        parameters=total_parameters(model),
        active_parameters=round(flops.active_parameters),
        flops_per_token=flops.per_token,
        peak_memory_bytes=memory.peak_bytes,
        activation_memory_bytes=memory.activation_bytes,
        trained=trained,
        flops_components=flops.per_token_components(),
        memory_method=memory.method,
        tokens=flops.tokens,
        val_loss=val_loss,
    )


def _si(x: float) -> str:
    """1234567 -> '1.23M', 45600000 -> '45.6M', 124439808 -> '124M'."""
    scales = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))
    unit, scale = next(((u, s) for u, s in scales if abs(x) >= s), ("", 1.0))
    value = x / scale
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f}{unit}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _with_change(value: str, change: float, first: bool) -> str:
    return value if first else f"{value} ({change:+.1%})"


def format_cost_table(rows: Sequence[CostRow]) -> str:
    """The rows as an aligned text table, changes against the first row in brackets."""
    header = ["name", "params", "active", "FLOPs/token", "peak memory", "activations", "val loss"]
    lines = [header]
    for i, row in enumerate(rows):
        lines.append(
            [
                row.name,
                _si(row.parameters),
                _si(row.active_parameters),
                _with_change(_si(row.flops_per_token), row.flops_vs_first, i == 0),
                _with_change(_mib(row.peak_memory_bytes), row.memory_vs_first, i == 0),
                _mib(row.activation_memory_bytes),
                "-" if row.val_loss is None else f"{row.val_loss:.4f}",
            ]
        )
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    out = []
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(line[1:], widths[1:])]
        out.append("  ".join(cells))
    return "\n".join(out)


# ---- config specs and the CLI ----------------------------------------------------------


def _parse_value(text: str) -> Any:
    """An override value: int, float, true/false, none, a JSON list, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # e.g. a chunk string such as [1-2-1]
    return text


def parse_config_spec(spec: str) -> tuple[str, PreTrainedConfig]:
    """``[LABEL=]ARCH:PRESET[:KaHb][:key=value...]`` -> (row name, config).

    Examples: ``gpt:small``, ``mom:small:K2H6S``, ``MoE=mom:small:K2H4:policy=moe``,
    ``moduleformer:tiny:k_att=1``. KaHb names a MoM's K, H and SKIP; every key=value
    overrides a config field. The row is named LABEL, or the spec itself.
    """
    from modformer.models.registry import ARCHITECTURES, build_config

    def fail(problem: str) -> ValueError:
        return ValueError(f"bad config spec {spec!r}: {problem}; the syntax is {SPEC_SYNTAX}")

    label, body = None, spec
    head = spec.split(":", 1)[0]
    if "=" in head:
        label, body = spec.split("=", 1)
        if not label:
            raise fail("the label before '=' is empty")
    parts = body.split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise fail("give at least ARCH:PRESET, e.g. gpt:small")
    arch, preset, rest = parts[0].lower(), parts[1], parts[2:]
    if arch not in ARCHITECTURES:
        raise fail(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
    overrides: dict[str, Any] = {}
    for part in rest:
        if "=" in part:
            key, value = part.split("=", 1)
            if not key:
                raise fail(f"override {part!r} has no field name")
            overrides[key] = _parse_value(value)  # build_config rejects unknown names
        elif arch == "mom" and "mom" not in overrides:
            overrides["mom"] = part
        else:
            raise fail(
                f"{part!r} is not key=value"
                + (" (only mom takes a KaHb name)" if arch != "mom" else "")
            )
    try:
        config = build_config(arch, preset, **overrides)
    except ValueError as e:
        raise fail(str(e)) from None
    return label or spec, config
