"""Token-to-expert dispatch and grouped matrix multiplies, without host syncs.

Both papers route each token to a few of many modules (MoM modules, ModuleFormer experts).
We compute only the selected (token, module) pairs: sort the pairs by module, run one
grouped GEMM over the contiguous per-module segments (`torch.nn.functional.grouped_mm`,
whose group offsets live on the device, so no `.tolist()` is needed), and scatter the
results back. This is the ScatterMoE/MegaBlocks idea in plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Dispatch:
    """Where each selected (token, slot) pair goes once pairs are sorted by module.

    `token_index[j]` is the token of the j-th sorted pair, `slot_index[j]` its position in
    the flattened (tokens x k) selection, `offsets` the cumulative pair count per module
    (int32, as grouped_mm wants), `counts` the pairs per module.
    """

    token_index: torch.Tensor
    slot_index: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor


def make_dispatch(expert_index: torch.Tensor, num_experts: int) -> Dispatch:
    """Group the (tokens, k) module choices by module.

    Entries equal to `num_experts` or above (e.g. a SKIP choice) or negative are left out:
    they sort to the end and fall outside every group's offset range.
    """
    flat = expert_index.reshape(-1)
    k = expert_index.shape[-1] if expert_index.dim() > 1 else 1
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    slot_index = torch.argsort(key, stable=True)
    # scatter_add rather than bincount: bincount reads its input's max back to the host on CUDA.
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_experts]
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return Dispatch(
        token_index=slot_index // k, slot_index=slot_index, offsets=offsets, counts=counts
    )


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` can run these operands.

    CPU: fp32/bf16/fp16; CUDA: bf16 on sm90+. Row strides must be multiples of 16 bytes.
    """
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    else:
        return False
    aligned = all((n * x.element_size()) % 16 == 0 for n in weight.shape[1:])
    return ok_dtype and aligned


def _rows_in_groups(n_rows: int, offsets: torch.Tensor) -> torch.Tensor:
    """(N, 1) bool: rows inside some group's segment (the rest are left-out pairs)."""
    return (torch.arange(n_rows, device=offsets.device) < offsets[-1])[:, None]


class _GroupedMM(torch.autograd.Function):
    """`F.grouped_mm` whose rows past the last group are exact zeros, forward and backward.

    grouped_mm leaves those rows uninitialised; left-out pairs (e.g. SKIP) live there.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor):
        ctx.save_for_backward(x, weight, offsets)
        y = F.grouped_mm(x, weight, offs=offsets)
        return y.masked_fill(~_rows_in_groups(x.shape[0], offsets), 0.0)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, offsets = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.grouped_mm(grad_y, weight.transpose(1, 2), offs=offsets)
            grad_x = grad_x.masked_fill(~_rows_in_groups(x.shape[0], offsets), 0.0)
        if ctx.needs_input_grad[1]:
            grad_w = F.grouped_mm(x.t(), grad_y, offs=offsets)
        return grad_x, grad_w, None


def _looped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Fallback for dtypes/devices grouped_mm lacks (fp64, fp32 on CUDA): one matmul per
    group. It needs the group sizes on the host, so it syncs once per call."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    parts = [x[s:e] @ weight[g] for g, (s, e) in enumerate(zip(starts, ends))]
    parts.append(x.new_zeros(x.shape[0] - ends[-1], weight.shape[2]))
    return torch.cat(parts)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y[j] = x[j] @ weight[g] (+ bias[g])` for rows j in group g's segment.

    x: (N, d_in) rows sorted by group; weight: (G, d_in, d_out); offsets: (G,) int32 end
    of each group's segment. Rows past offsets[-1] (left-out pairs) come back as zeros.
    """
    if x.dim() != 2 or weight.dim() != 3 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"grouped_linear: expected x (N, d_in) and weight (G, d_in, d_out), got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if grouped_mm_supported(x, weight):
        y = _GroupedMM.apply(x, weight, offsets)
    else:
        y = _looped_mm(x, weight, offsets)
    if bias is not None:
        group_of_row = torch.searchsorted(
            offsets, torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype), right=True
        )
        # Rows past the last group index the zero row appended to the bias.
        y = y + F.pad(bias, (0, 0, 0, 1))[group_of_row]
    return y
