"""Top-k routing, sparse FFN experts and a mixture of attention heads (ModuleFormer sec. 3).

- ``TopKRouter``: ``g(m|x) = TopK(softmax(A act(B x)))`` (eqs. 1-2), softmax in at
  least fp32 (fp64 stays fp64), the k kept gates are not renormalised.
  ``router_type="linear"`` is JetMoE's gate instead: ``logits = A x``, top-k of the
  logits, softmax over the k kept logits.
- ``SparseMoE``: ``y = sum_m g(m|x) f_m(x)`` with FFN experts ``D_emb -> D_ffd -> D_emb``
  (``expert_mlp="swiglu"``: JetMoE's gated experts ``(act(x W_g) * x W_u) W_o``).
- ``MixtureOfAttentionHeads`` (MoA): attention experts with their own ``W_q``/``W_o``
  and keys/values shared by all experts, stick-breaking attention (eqs. 3-5), or
  softmax attention with RoPE (``attention_type="softmax_rope"``, JetMoE, Table 4).
- ``output_bias``: one bias vector added to the combined output (JetMoE's MoA and MoE).

Inserted experts (sec. 4.3, continual learning): with ``num_inserted > 0`` the last
``num_inserted`` experts of a layer, and their rows ``A'`` of the expert embedding, are
stored as parameters of their own (``*_inserted``), concatenated after the original ones
in the forward pass. Freezing the original experts is then plain ``requires_grad=False``
on whole parameters, which no optimizer can move (a gradient mask on one stacked tensor
would still be moved by AdamW's weight decay).

Both expert layers are `Experts` (``nn/experts.py``): expert weights are stacked as
(experts, d_in, d_out), and the (token, expert) pairs of a routing decision are computed
by the layer's backend, ``"grouped"`` (only the selected pairs, one grouped GEMM per
projection; the default) or ``"loop"`` (one masked matmul per expert, the definition).
Padding tokens (``token_mask`` False) select no expert at all: their outputs are 0.
Nothing here reads a value back to the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modformer.nn.activations import get_activation
from modformer.nn.experts import Experts, compute_dtype
from modformer.nn.rope_attention import apply_rotary, softmax_attention
from modformer.nn.routers import RouterSlots, routing_dtype
from modformer.nn.routing import RoutingDecision
from modformer.nn.stick_breaking import stick_breaking_attention

ROUTER_TYPES = ("mlp", "linear")
EXPERT_MLPS = ("gelu", "swiglu")
ATTENTION_TYPES = ("stick_breaking", "softmax_rope")


def _check_inserted(num_inserted: int, num_experts: int) -> None:
    if not 0 <= num_inserted <= num_experts:
        raise ValueError(
            f"num_inserted must be in [0, num_experts={num_experts}], got {num_inserted}"
        )


def _inserted_weight(num_inserted: int, d_in: int, d_out: int) -> nn.Parameter | None:
    """The stacked weights of the inserted experts, or None when there are none."""
    if num_inserted == 0:
        return None
    return nn.Parameter(torch.randn(num_inserted, d_in, d_out) * 0.02)


def _all_experts(original: torch.Tensor, inserted: torch.Tensor | None) -> torch.Tensor:
    """(N, d_in, d_out): the original experts, then the inserted ones."""
    return original if inserted is None else torch.cat([original, inserted])


class TopKRouter(nn.Module):
    """Eqs. 1-2: ``TopK(softmax(A act(B x)))``.

    ``input_proj.weight`` is ``B`` (D_rtr x D_emb) and ``expert_embedding.weight`` is
    the expert embedding ``A`` (one row per original expert, D_rtr wide); with
    ``bias`` (IBM's official gate) ``B x`` becomes ``B x + b``. Inserted
    experts (sec. 4.3) have their rows ``A'`` in ``inserted_expert_embedding``, and the
    logits are ``[A; A'] act(B x)`` (eq. 9).

    A pruned router has ``slots`` (`RouterSlots`): it computes its softmax at the
    unpruned layout, so the kept experts' gates stay bit-identical; its outputs are per
    kept expert like any router's.

    ``router_type="linear"`` (JetMoE's ``JetMoeTopKGating``): no ``B``, the logits are
    ``A x`` with ``A`` (num_experts x D_emb, no bias) in ``expert_embedding``; the top-k
    are taken on the logits and the gates are the softmax of the k kept logits (the
    top-k probabilities renormalised). ``probs`` is still the full softmax.
    """

    def __init__(
        self,
        n_embd: int,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        activation: str = "relu",
        num_inserted: int = 0,
        slots: RouterSlots | None = None,
        router_type: str = "mlp",
        bias: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if router_type not in ROUTER_TYPES:
            raise ValueError(
                f"router_type {router_type!r} is unknown; choose one of {ROUTER_TYPES}"
            )
        if bias and router_type != "mlp":
            raise ValueError(f"bias=True needs the 'mlp' router's B; got {router_type!r}")
        _check_inserted(num_inserted, num_experts)
        self.num_experts = num_experts
        self.num_inserted = num_inserted
        self.top_k = top_k
        self.renormalize = router_type == "linear"
        if router_type == "linear":  # A x: the expert embedding reads x itself
            self.input_proj, self.act, hidden_size = None, nn.Identity(), n_embd
        else:
            self.input_proj = nn.Linear(n_embd, hidden_size, bias=bias)
            self.act = get_activation(activation)
        self.expert_embedding = nn.Linear(hidden_size, num_experts - num_inserted, bias=False)
        self.inserted_expert_embedding = (
            nn.Linear(hidden_size, num_inserted, bias=False) if num_inserted else None
        )
        if slots is not None and len(slots.slots) != num_experts:
            raise ValueError(f"{len(slots.slots)} slots given for {num_experts} experts")
        self.slots = slots

    def expert_embedding_weight(self) -> torch.Tensor:
        """``[A; A']``: (num_experts, D_rtr), the inserted experts' rows last."""
        if self.inserted_expert_embedding is None:
            return self.expert_embedding.weight
        return torch.cat([self.expert_embedding.weight, self.inserted_expert_embedding.weight])

    def forward(self, x: torch.Tensor) -> RoutingDecision:
        """x: (tokens, n_embd) -> the decision: (tokens, k) ``indices`` and ``weights``
        (the kept gates), the (tokens, N) ``logits`` ``h(x)`` and ``probs`` (their
        softmax, the full distribution the auxiliary losses need), in at least fp32."""
        hidden = x if self.input_proj is None else self.act(self.input_proj(x))
        weight = self.expert_embedding_weight()
        if self.slots is None:
            logits = F.linear(hidden, weight)
        else:  # a pruned router: logits at the unpruned layout, -inf in empty slots
            logits = self.slots.linear(hidden, weight)
        logits = logits.to(routing_dtype(logits.dtype))
        probs = torch.softmax(logits, dim=-1)
        if self.renormalize:  # JetMoE: top-k of the logits, softmax over the kept ones
            kept_logits, top_k_indices = logits.topk(self.top_k, dim=-1)
            top_k_gates = torch.softmax(kept_logits, dim=-1)
        else:
            top_k_gates, top_k_indices = probs.topk(self.top_k, dim=-1)
        if self.slots is not None:
            top_k_indices = self.slots.choice_index(top_k_indices)
            logits, probs = self.slots.choices(logits), self.slots.choices(probs)
        return RoutingDecision(
            top_k_indices, top_k_gates, self.num_experts, probs=probs, logits=logits
        )


def _output_bias(enabled: bool, n_embd: int) -> nn.Parameter | None:
    """The bias added to a layer's combined output (JetMoE), or None."""
    return nn.Parameter(torch.zeros(n_embd)) if enabled else None


class SparseMoE(Experts):
    """Sparse mixture of FFN experts: ``y = sum_m g(m|x) f_m(x)``, only top-k computed.

    Expert m is ``act(x @ w_in[m]) @ w_out[m]`` (no biases, as the official code). The
    last ``num_inserted`` experts live in ``w_in_inserted`` / ``w_out_inserted``.

    ``expert_mlp="swiglu"`` (JetMoE): ``w_in[m]`` is (D_emb, 2 D_ffd), its first D_ffd
    columns the gate and the last D_ffd the up projection, and expert m is
    ``(act(x W_gate) * (x W_up)) @ w_out[m]`` (SwiGLU with ``activation="silu"``).
    ``output_bias``: ``y + b`` with one (D_emb,) bias per layer.
    ``backend``: the `Experts` backend, ``"grouped"`` or ``"loop"``.
    """

    def __init__(
        self,
        n_embd: int,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        activation: str = "gelu_new",
        router_hidden: int = 256,
        router_activation: str = "relu",
        num_inserted: int = 0,
        slots: RouterSlots | None = None,
        router_type: str = "mlp",
        expert_mlp: str = "gelu",
        output_bias: bool = False,
        router_bias: bool = False,
        backend: str = "grouped",
    ):
        super().__init__(num_experts, backend)
        if expert_mlp not in EXPERT_MLPS:
            raise ValueError(f"expert_mlp {expert_mlp!r} is unknown; choose one of {EXPERT_MLPS}")
        self.num_inserted = num_inserted
        self.top_k = top_k
        self.gated = expert_mlp == "swiglu"
        self.router = TopKRouter(
            n_embd,
            num_experts,
            top_k,
            router_hidden,
            router_activation,
            num_inserted,
            slots,
            router_type=router_type,
            bias=router_bias,
        )
        original = num_experts - num_inserted
        in_width = 2 * hidden_size if self.gated else hidden_size
        self.w_in = nn.Parameter(torch.randn(original, n_embd, in_width) * 0.02)
        self.act = get_activation(activation)
        self.w_out = nn.Parameter(torch.randn(original, hidden_size, n_embd) * 0.02)
        self.w_in_inserted = _inserted_weight(num_inserted, n_embd, in_width)
        self.w_out_inserted = _inserted_weight(num_inserted, hidden_size, n_embd)
        self.output_bias = _output_bias(output_bias, n_embd)

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters a token only touches for its k selected experts."""
        params = [self.w_in, self.w_out, self.w_in_inserted, self.w_out_inserted]
        return [p for p in params if p is not None]

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingDecision]:
        """x: (..., n_embd); token_mask: x.shape[:-1].numel() bools, True = real token."""
        flat = x.reshape(-1, x.shape[-1])
        route = self.router(flat)
        # Without padding every pick is one of the experts: no left-out pairs.
        pairs = self.route(route.indices, route.weights, token_mask, all_picked=token_mask is None)
        w_in = _all_experts(self.w_in, self.w_in_inserted)
        w_out = _all_experts(self.w_out, self.w_out_inserted)
        hidden = pairs.linear(pairs.gather(flat.to(compute_dtype(flat))), w_in)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = self.act(gate) * up
        else:
            hidden = self.act(hidden)
        y = pairs.linear_sum(hidden, w_out)
        if self.output_bias is not None:
            y = y + self.output_bias.to(y.dtype)
        return y.view(*x.shape[:-1], -1), route


class MixtureOfAttentionHeads(Experts):
    """MoA with stick-breaking attention experts (sec. 3.1-3.2).

    Expert m has its own ``W_q[m]`` (D_emb x D_att, split into ``n_head`` heads of
    ``D_att / n_head``) and ``W_o[m]`` (D_att x D_emb); the keys and values
    ``x W_k``, ``x W_v`` are shared by all experts (the identity when ``D_att == D_emb``
    and one head, as in the paper and the official code; ``kv_bias`` gives the
    projections biases, as IBM's code has). For each token the output is
    ``sum_{m in top-k} g_m * W_o[m]^T attn(q_m, K, V)``.

    Efficient form: K/V are computed once per token (``project_kv``, so the caller can
    add a cache or a Transformer-XL memory in front); the k selected queries of every
    token are computed by one grouped GEMM and laid out as ``k * n_head`` heads, so a
    single stick-breaking call serves all experts; ``W_o`` is one more grouped GEMM.
    The last ``num_inserted`` experts live in ``w_q_inserted`` / ``w_o_inserted``.

    ``attention_type="softmax_rope"`` (JetMoE; the Table 4 baseline) replaces
    stick-breaking by causal softmax attention (SDPA) on RoPE-rotated queries and keys
    (`modformer.nn.rope_attention`): every query head and the shared keys are rotated
    over their full head_dim; the caller rotates the keys (`rotate`) before caching them
    and passes the same ``rope`` (cos, sin) angles here for the queries.
    ``output_bias``: ``y + b`` with one (D_emb,) bias per layer (JetMoE's MoA bias).
    ``backend``: the `Experts` backend, ``"grouped"`` or ``"loop"``.
    """

    def __init__(
        self,
        n_embd: int,
        num_experts: int,
        top_k: int,
        att_hidden: int,
        n_head: int = 1,
        router_hidden: int = 256,
        router_activation: str = "relu",
        block_size: int = 128,
        num_inserted: int = 0,
        slots: RouterSlots | None = None,
        router_type: str = "mlp",
        attention_type: str = "stick_breaking",
        output_bias: bool = False,
        router_bias: bool = False,
        kv_bias: bool = False,
        backend: str = "grouped",
    ):
        super().__init__(num_experts, backend)
        if att_hidden % n_head != 0:
            raise ValueError(f"att_hidden ({att_hidden}) must be divisible by n_head ({n_head})")
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(
                f"attention_type {attention_type!r} is unknown; choose one of {ATTENTION_TYPES}"
            )
        self.num_inserted = num_inserted
        self.top_k = top_k
        self.n_head = n_head
        self.head_dim = att_hidden // n_head
        self.att_hidden = att_hidden
        self.block_size = block_size
        self.attention_type = attention_type
        self.router = TopKRouter(
            n_embd,
            num_experts,
            top_k,
            router_hidden,
            router_activation,
            num_inserted,
            slots,
            router_type=router_type,
            bias=router_bias,
        )
        original = num_experts - num_inserted
        self.w_q = nn.Parameter(torch.randn(original, n_embd, att_hidden) * 0.02)
        self.w_o = nn.Parameter(torch.randn(original, att_hidden, n_embd) * 0.02)
        self.w_q_inserted = _inserted_weight(num_inserted, n_embd, att_hidden)
        self.w_o_inserted = _inserted_weight(num_inserted, att_hidden, n_embd)
        self.shared_kv_is_identity = att_hidden == n_embd and n_head == 1
        if kv_bias and self.shared_kv_is_identity:
            raise ValueError(
                "kv_bias=True needs K/V projections, but with att_hidden == n_embd and one "
                "head they are the identity; set kv_bias=False"
            )
        # W_k and W_v side by side; None when both are the identity.
        self.kv_proj = (
            None if self.shared_kv_is_identity else nn.Linear(n_embd, 2 * att_hidden, bias=kv_bias)
        )
        self.output_bias = _output_bias(output_bias, n_embd)

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters a token only touches for its k selected experts."""
        params = [self.w_q, self.w_o, self.w_q_inserted, self.w_o_inserted]
        return [p for p in params if p is not None]

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, n_head * head_dim) -> (B, n_head, T, head_dim)."""
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared keys and values of x (B, T, n_embd): two (B, n_head, T, head_dim)."""
        if self.kv_proj is None:
            return self._split_heads(x), self._split_heads(x)
        keys, values = self.kv_proj(x).chunk(2, dim=-1)
        return self._split_heads(keys), self._split_heads(values)

    def rotate(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """RoPE on (B, H, T, head_dim) with the angles of its T positions; x itself for
        stick-breaking attention (``rope`` None)."""
        if rope is None:
            return x
        cos, sin = rope
        return apply_rotary(x, cos, sin).to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, RoutingDecision]:
        """Attend from x (B, T, n_embd) to ``keys``/``values`` (B, n_head, Tk, head_dim).

        The last T keys belong to x; the first ``Tk - T`` are a prefix (KV cache or
        memory) seen by every query. ``token_mask`` (B*T,) marks real query tokens and
        ``key_padding_mask`` (B, Tk) real keys (True = real). For softmax_rope attention
        ``rope`` holds the (cos, sin) angles (B, 1, >= T, head_dim) whose last T rows are
        x's positions, and ``keys`` must already be rotated.
        """
        B, T, C = x.shape
        k = self.top_k
        flat = x.reshape(-1, C)
        route = self.router(flat)
        pairs = self.route(route.indices, route.weights, token_mask)
        dtype = compute_dtype(flat)

        # Queries of the selected pairs, put back at their (token, slot) place; slot s of
        # a token becomes heads s * n_head .. (s + 1) * n_head - 1.
        q_pairs = pairs.linear(
            pairs.gather(flat.to(dtype)), _all_experts(self.w_q, self.w_q_inserted)
        )
        q = pairs.slot_order(q_pairs)
        q = q.view(B, T, k * self.n_head, self.head_dim).transpose(1, 2)
        # Every slot attends to the same shared keys/values: repeat them per slot.
        keys = keys.to(dtype).repeat(1, k, 1, 1)
        values = values.to(dtype).repeat(1, k, 1, 1)
        if self.attention_type == "softmax_rope":
            if rope is None:
                raise ValueError("softmax_rope attention needs the rope (cos, sin) angles")
            cos, sin = rope
            q = self.rotate(q, (cos[:, :, -T:], sin[:, :, -T:]))
            attended = softmax_attention(q, keys, values, key_padding_mask)
        else:
            attended = stick_breaking_attention(q, keys, values, key_padding_mask, self.block_size)

        attended = attended.transpose(1, 2).reshape(B * T * k, self.att_hidden)
        w_o = _all_experts(self.w_o, self.w_o_inserted)
        y = pairs.linear_sum(pairs.pair_order(attended), w_o)
        if self.output_bias is not None:
            y = y + self.output_bias.to(y.dtype)
        return y.view(B, T, -1), route
