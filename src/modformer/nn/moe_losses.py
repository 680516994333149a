"""Auxiliary losses and statistics of top-k routers (ModuleFormer sec. 4, design §3).

Every function takes one router's fp32 ``logits`` of shape (tokens, experts) (the
probabilities are ``softmax(logits)``) and an optional ``token_mask`` (tokens,) bool,
True for real tokens. Padding tokens take no part: they are dropped from every mean,
so a padded batch gives the same value as the same batch without the padding.

- ``mutual_information_loss``: eq. 7, ``-H(m) + mean_x H(m|x)`` (pretraining).
- ``switch_load_balancing_loss`` (``switch_balance`` from probabilities) and
  ``router_z_loss``: the Switch Transformer / ST-MoE alternative (the official code
  adds them as ``switch + 0.1 * z``).
- ``pooled_switch_loss``: JetMoE's variant, statistics pooled over all routers.
- ``load_concentration_loss``: eq. 8, ``H(m)`` (fine-tuning; concentrates the load).
- ``routing_regularization``: eq. 10, ``||A'||^2`` over newly inserted expert embeddings.
- ``expert_load``: fraction of real tokens that have each expert in their top-k.

No function reads a value back to the host, so they are safe inside a training step.
"""

from __future__ import annotations

import torch


def _token_weights(n_tokens: int, token_mask: torch.Tensor | None, like: torch.Tensor):
    """(tokens,) fp32 weights that sum to 1 over the real tokens.

    An all-padding batch gets zero weights (every mean is then 0 instead of NaN).
    """
    if token_mask is None:
        return torch.full((n_tokens,), 1.0 / n_tokens, dtype=like.dtype, device=like.device)
    if token_mask.shape != (n_tokens,):
        raise ValueError(
            f"token_mask has shape {tuple(token_mask.shape)} but the router saw {n_tokens} "
            f"tokens; pass a flat (tokens,) bool mask, True for real tokens."
        )
    weights = token_mask.to(like.dtype)
    return weights / weights.sum().clamp_min(1.0)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half/bf16/fp32 logits, fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def mean_probs(probs: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_x probs(x)`` over the real tokens: (tokens, experts) -> (experts,)."""
    return _token_weights(probs.shape[0], token_mask, probs) @ probs


def marginal_expert_probs(logits: torch.Tensor, token_mask: torch.Tensor | None = None):
    """``p(m) = mean_x softmax(logits)(m)`` over the real tokens: shape (experts,)."""
    return mean_probs(torch.softmax(_at_least_fp32(logits), dim=-1), token_mask)


def _entropy_of_distribution(p: torch.Tensor) -> torch.Tensor:
    """``-sum_m p log p`` over the last axis; 0 log 0 = 0 with a finite gradient."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


def marginal_entropy(logits: torch.Tensor, token_mask: torch.Tensor | None = None):
    """``H(m)``: entropy of the batch's expert marginal (high = balanced load)."""
    return _entropy_of_distribution(marginal_expert_probs(logits, token_mask))


def conditional_entropy(logits: torch.Tensor, token_mask: torch.Tensor | None = None):
    """``mean_x H(m|x)``: mean entropy of each token's routing distribution.

    Uses ``log_softmax`` rather than ``log(softmax)`` so that a probability that
    underflows to 0 contributes exactly 0 (and its logit stays finite).
    """
    logits = _at_least_fp32(logits)
    per_token = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    return _token_weights(logits.shape[0], token_mask, logits) @ per_token


def mutual_information_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None):
    """Eq. 7: ``L_MI = -H(m) + mean_x H(m|x)``.

    Minimising it maximises the mutual information between tokens and experts: the
    load is spread over all experts across the batch (high ``H(m)``) while each token
    commits to few experts (low ``H(m|x)``). Its minimum is ``-log(N)``.
    """
    return -marginal_entropy(logits, token_mask) + conditional_entropy(logits, token_mask)


def load_concentration_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None):
    """Eq. 8: ``L = H(m)``; minimising it concentrates a task's load on fewer experts."""
    return marginal_entropy(logits, token_mask)


def expert_load(
    top_k_indices: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of real tokens that have each expert in their top-k: (experts,) fp32.

    The entries sum to k. This is the activation frequency ``f_m`` used for pruning
    (sec. 5.3). Built with ``scatter_add`` (``bincount`` would sync with the host on CUDA).
    """
    n_tokens, k = top_k_indices.shape
    weights = _token_weights(n_tokens, token_mask, torch.empty(0, device=top_k_indices.device))
    counts = torch.zeros(num_experts, dtype=torch.float32, device=top_k_indices.device)
    return counts.scatter_add_(
        0, top_k_indices.reshape(-1), weights[:, None].expand(n_tokens, k).reshape(-1)
    )


def switch_load_balancing_loss(
    logits: torch.Tensor, top_k_indices: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer balance loss ``N * sum_m f_m * P_m``.

    ``f_m`` is expert m's share of the (token, slot) assignments and ``P_m`` its mean
    router probability, both over the real tokens and each summing to 1 over experts
    (as in the official ModuleFormer code). It equals 1 for a perfectly uniform router
    and grows as the load concentrates. Only ``P_m`` carries a gradient.
    """
    return switch_balance(torch.softmax(_at_least_fp32(logits), dim=-1), top_k_indices, token_mask)


def switch_balance(
    probs: torch.Tensor, top_k_indices: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`switch_load_balancing_loss` from the router's probabilities (tokens, experts), for
    routers whose distribution is not the softmax of plain logits (MoM's temperature,
    pruned slots)."""
    num_experts = probs.shape[-1]
    assignment_share = expert_load(top_k_indices, num_experts, token_mask) / top_k_indices.shape[1]
    return num_experts * (assignment_share * mean_probs(probs, token_mask)).sum()


def pooled_switch_loss(
    logits: list[torch.Tensor],
    top_k_indices: list[torch.Tensor],
    token_mask: torch.Tensor | None = None,
    slots: list[tuple[torch.Tensor, int] | None] | None = None,
) -> torch.Tensor:
    """JetMoE's balance loss (transformers' ``load_balancing_loss_func``) over R routers
    that see the same tokens and have the same N experts: ``N * sum_m f_m * P_m`` with

        f_m = mean_r (fraction of real tokens with m in router r's top-k)   (sums to k)
        P_m = mean_r (mean router-r probability of m over the real tokens)  (sums to 1)

    The statistics are pooled over the routers before the product (the per-router
    `switch_load_balancing_loss` averaged over routers differs, and its f sums to 1).
    ``slots[r]`` = (slot of each expert, N) places a pruned router's experts at their
    unpruned positions (removed experts count 0), so pruning keeps the pooling.
    """
    loads, probs = [], []
    for r, (z, indices) in enumerate(zip(logits, top_k_indices)):
        load = expert_load(indices, z.shape[-1], token_mask)
        prob = marginal_expert_probs(z, token_mask)
        if slots is not None and slots[r] is not None:
            where, width = slots[r]
            load = load.new_zeros(width).index_copy(0, where, load)
            prob = prob.new_zeros(width).index_copy(0, where, prob)
        loads.append(load)
        probs.append(prob)
    widths = {load.shape[0] for load in loads}
    if len(widths) != 1:
        raise ValueError(
            f"pooled_switch_loss needs routers with one expert count; got {sorted(widths)}"
        )
    num_experts = widths.pop()
    return num_experts * (torch.stack(loads).mean(0) * torch.stack(probs).mean(0)).sum()


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None):
    """ST-MoE z-loss ``mean_x (logsumexp_m logits)^2``: keeps router logits small."""
    log_z = torch.logsumexp(_at_least_fp32(logits), dim=-1)
    return _token_weights(logits.shape[0], token_mask, log_z) @ log_z.square()


def switch_loss(
    logits: torch.Tensor,
    top_k_indices: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    z_loss_coef: float = 0.1,
) -> torch.Tensor:
    """The alternative to the MI loss: ``switch_load_balancing + z_loss_coef * z_loss``."""
    balance = switch_load_balancing_loss(logits, top_k_indices, token_mask)
    return balance + z_loss_coef * router_z_loss(logits, token_mask)


def routing_regularization(new_expert_embedding: torch.Tensor) -> torch.Tensor:
    """Eq. 10: ``||A'||^2``, the squared Frobenius norm of the inserted experts' rows of A.

    Pass the rows of the router's expert embedding that belong to newly inserted
    experts (a slice such as ``A[n_old:]``, or a separate parameter). Large rows make
    the router prefer the new experts; penalising them protects the old domain.
    An empty slice gives 0.
    """
    return _at_least_fp32(new_expert_embedding).square().sum()
