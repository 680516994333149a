"""Token-to-expert dispatch and grouped matrix multiplies, without host syncs.

Both papers route each token to a few of many modules (MoM modules, ModuleFormer experts).
We compute only the selected (token, module) pairs: sort the pairs by module, run one
grouped GEMM over the contiguous per-module segments (`torch.nn.functional.grouped_mm`,
whose group offsets live on the device, so no `.tolist()` is needed), and scatter the
results back. This is the ScatterMoE/MegaBlocks idea in plain PyTorch.

The grouped GEMM is the custom op `torch.ops.modformer.grouped_mm` (with a fake
implementation and its own backward), so `torch.compile` sees one opaque node whatever
kernel runs inside: `F.grouped_mm` where the device and dtype have it, else one matmul per
group (fp64; fp32 on CUDA), which reads the group sizes back to the host.

Moving rows between tokens and pairs is done with gathers in both directions:
`gather_pairs` copies each token's row to its pairs (backward: un-sort, sum over the k
picks), `combine_pairs` un-sorts the pair rows with the inverse permutation and sums
each token's k rows with one batched (1 x k) @ (k x f) product (backward: a gather by
token). Indexing and `index_add_` would scatter-add instead, which is slow on CPU with
several threads and needs atomics on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Dispatch:
    """Where each selected (token, slot) pair goes once pairs are sorted by module.

    `token_index[j]` is the token of the j-th sorted pair, `slot_index[j]` its position in
    the flattened (tokens x k) selection and `pair_of_slot` the inverse permutation
    (`pair_of_slot[slot_index[j]] == j`), `offsets` the cumulative pair count per module
    (int32, as grouped_mm wants), `counts` the pairs per module, `k` the picks per token.
    """

    token_index: torch.Tensor
    slot_index: torch.Tensor
    pair_of_slot: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    k: int


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
    pair_of_slot = torch.empty_like(slot_index).scatter_(
        0, slot_index, torch.arange(slot_index.numel(), device=flat.device)
    )
    return Dispatch(
        token_index=slot_index // k,
        slot_index=slot_index,
        pair_of_slot=pair_of_slot,
        offsets=offsets,
        counts=counts,
        k=k,
    )


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` can run these operands.

    CPU: fp32/bf16/fp16; CUDA: bf16 on sm90+. Row strides must be multiples of 16 bytes.
    """
    if x.dtype != weight.dtype:
        return False
    return _kernel_supported(x, weight.shape[1], weight.shape[2])


def _kernel_supported(x: torch.Tensor, d_in: int, d_out: int) -> bool:
    """grouped_mm runs x's dtype and device with (d_in x d_out) group matrices."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    else:
        return False
    aligned = all((n * x.element_size()) % 16 == 0 for n in (d_in, d_out))
    return ok_dtype and aligned


def _rows_in_groups(n_rows: int, offsets: torch.Tensor) -> torch.Tensor:
    """(N, 1) bool: rows inside some group's segment (the rest are left-out pairs)."""
    return (torch.arange(n_rows, device=offsets.device) < offsets[-1])[:, None]


def _looped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Fallback for dtypes/devices grouped_mm lacks (fp64, fp32 on CUDA): one matmul per
    group. It needs the group sizes on the host, so it syncs once per call."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    parts = [x[s:e] @ weight[g] for g, (s, e) in enumerate(zip(starts, ends))]
    parts.append(x.new_zeros(x.shape[0] - ends[-1], weight.shape[2]))
    return torch.cat(parts)


def _looped_weight_grad(x: torch.Tensor, grad_y: torch.Tensor, offsets: torch.Tensor):
    """`_looped_mm`'s weight gradient: (G, d_in, d_out), group g's `x^T @ grad_y`."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    return torch.stack([x[s:e].t() @ grad_y[s:e] for s, e in zip(starts, ends)])


# The grouped GEMM is a custom op (`torch.ops.modformer.grouped_mm`) so torch.compile
# treats it as one opaque node with a fake (shape-only) implementation and our own
# backward: the meta function of `aten._grouped_mm` only accepts bf16 (the CUDA kernel's
# rule), which broke compiling fp32 models on CPU. The kernel choice (grouped_mm or a
# per-group loop) is made inside the op, at run time, so it never enters the graph.


@torch.library.custom_op("modformer::grouped_mm", mutates_args=())
def _grouped_mm_op(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, zero_left_out: bool
) -> torch.Tensor:
    """`y[j] = x[j] @ weight[g]` for rows j of group g; rows past the last group are 0
    (or garbage with `zero_left_out=False`, for callers that have no such rows)."""
    if not grouped_mm_supported(x, weight):
        return _looped_mm(x, weight, offsets)
    y = F.grouped_mm(x, weight, offs=offsets)
    if zero_left_out:
        # grouped_mm leaves rows past the last group uninitialised; left-out pairs (e.g.
        # SKIP) live there. In place: y is a fresh tensor of our own.
        y.masked_fill_(~_rows_in_groups(x.shape[0], offsets), 0.0)
    return y


@_grouped_mm_op.register_fake
def _(x, weight, offsets, zero_left_out):
    return x.new_empty(x.shape[0], weight.shape[2])


@torch.library.custom_op("modformer::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad_op(
    x: torch.Tensor, grad_y: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """(G, d_in, d_out): group g's `x[rows of g]^T @ grad_y[rows of g]` (rows past the last
    group take no part)."""
    grad_y = grad_y.contiguous()
    if x.dtype != grad_y.dtype or not _kernel_supported(x, x.shape[1], grad_y.shape[1]):
        return _looped_weight_grad(x, grad_y, offsets)
    return F.grouped_mm(x.t(), grad_y, offs=offsets)


@_grouped_mm_weight_grad_op.register_fake
def _(x, grad_y, offsets):
    return x.new_empty(offsets.shape[0], x.shape[1], grad_y.shape[1])


def _grouped_mm_setup_context(ctx, inputs, output) -> None:
    x, weight, offsets, zero_left_out = inputs
    ctx.save_for_backward(x, weight, offsets)
    ctx.zero_left_out = zero_left_out


def _grouped_mm_backward(ctx, grad_y: torch.Tensor):
    x, weight, offsets = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _grouped_mm_op(grad_y, weight.transpose(1, 2), offsets, ctx.zero_left_out)
    if ctx.needs_input_grad[1]:
        grad_w = _grouped_mm_weight_grad_op(x, grad_y, offsets)
    return grad_x, grad_w, None, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup_context)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    zero_left_out: bool = True,
) -> torch.Tensor:
    """`y[j] = x[j] @ weight[g] (+ bias[g])` for rows j in group g's segment.

    x: (N, d_in) rows sorted by group; weight: (G, d_in, d_out); offsets: (G,) int32 end
    of each group's segment. Rows past offsets[-1] (left-out pairs) come back as zeros,
    and so do their input gradients. `zero_left_out=False` says there are no such rows
    (offsets[-1] == N): it saves a pass over the output, and leaves garbage otherwise.
    """
    if x.dim() != 2 or weight.dim() != 3 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"grouped_linear: expected x (N, d_in) and weight (G, d_in, d_out), got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    y = _grouped_mm_op(x, weight, offsets, zero_left_out)
    if bias is not None:
        group_of_row = torch.searchsorted(
            offsets, torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype), right=True
        )
        # Rows past the last group index the zero row appended to the bias.
        y = y + F.pad(bias, (0, 0, 0, 1))[group_of_row]
    return y


class _PermuteRows(torch.autograd.Function):
    """`x[perm]` for a permutation `perm` with inverse `inverse`; the backward is the
    gather `grad[inverse]` (autograd's own backward of indexing is a scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor):
        ctx.save_for_backward(perm, inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        perm, inverse = ctx.saved_tensors
        return _PermuteRows.apply(grad, inverse, perm), None, None


class _GatherPairs(torch.autograd.Function):
    """`gather_pairs`. The backward un-sorts the row gradients to (token, slot) order
    and sums each token's k rows: a gather and a reduction, where autograd's backward
    of indexing is a scatter-add (slow on CPU with several threads, atomics on GPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_index: torch.Tensor, pair_of_slot: torch.Tensor):
        ctx.save_for_backward(pair_of_slot)
        ctx.num_tokens = x.shape[0]
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pair_of_slot,) = ctx.saved_tensors
        by_slot = grad.index_select(0, pair_of_slot)
        return by_slot.view(ctx.num_tokens, -1, grad.shape[-1]).sum(1), None, None


def gather_pairs(x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """(n, d) token rows -> (n * k, d): the row of each pair's token, in sorted pair order
    (the input of `grouped_linear`)."""
    return _GatherPairs.apply(x, dispatch.token_index, dispatch.pair_of_slot)


def slot_order(rows: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """(n * k, f) rows in sorted pair order -> the same rows in (token, slot) order."""
    return _PermuteRows.apply(rows, dispatch.pair_of_slot, dispatch.slot_index)


def pair_order(rows: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """(n * k, f) rows in (token, slot) order -> the same rows in sorted pair order."""
    return _PermuteRows.apply(rows, dispatch.slot_index, dispatch.pair_of_slot)


class _CombinePairs(torch.autograd.Function):
    """`combine_pairs`. Forward: un-sort the pair rows to (token, slot) order and take
    each token's weighted sum, one batched (1 x k) @ (k x f) product. Backward: a pair
    row's gradient is its token's output gradient times its weight (a gather by token,
    scaled in place); a weight's gradient is its row's dot product with that gradient.
    """

    @staticmethod
    def forward(ctx, rows, weight, token_index, pair_of_slot, slot_index):
        n, k = weight.shape
        by_slot = rows.index_select(0, pair_of_slot).view(n, k, rows.shape[-1])
        ctx.save_for_backward(
            by_slot if ctx.needs_input_grad[1] else None, weight, token_index, slot_index
        )
        return torch.bmm(weight.view(n, 1, k), by_slot).view(n, -1)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        by_slot, weight, token_index, slot_index = ctx.saved_tensors
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = grad_y.index_select(0, token_index)
            grad_rows.mul_(weight.reshape(-1)[slot_index, None])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(by_slot, grad_y.unsqueeze(2)).view(weight.shape)
        return grad_rows, grad_weight, None, None, None


def combine_pairs(
    rows: torch.Tensor, dispatch: Dispatch, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Each token's sum over its k pair rows: `y[t] = sum_s weight[t, s] * row(t, s)`.

    rows: (n * k, f) in sorted pair order (as `grouped_linear` returns them);
    weight: (n, k) per-pick weights, or None for a plain sum. Returns (n, f).
    Left-out pairs contribute their rows, which `grouped_linear` leaves at zero.
    """
    n = rows.shape[0] // dispatch.k
    if weight is None:
        weight = rows.new_ones(n, dispatch.k)
    return _CombinePairs.apply(
        rows,
        weight.to(rows.dtype),
        dispatch.token_index,
        dispatch.pair_of_slot,
        dispatch.slot_index,
    )
