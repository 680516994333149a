"""Configuration of ModuleFormer (design §3; ModuleFormer paper sec. 3-5, Table 1).

Choices the paper leaves open, and where they come from:

- ``n_head`` (heads per attention expert): the paper calls ``D_att`` "the attention
  head dimension", i.e. each MoLM attention expert is one head of size 1024; the
  official code's MoLM configs likewise use one head, and then (``D_att == D_emb``)
  ``W_k``/``W_v`` are the identity. The MoLM presets use ``n_head=1``.
- ``router_hidden`` (``D_rtr``): 256, the official code's ``gating_size``.
- ``vocab_size``: 50295, the official code's default (the Codegen tokenizer).
- ``router_activation``: ReLU as in eq. 2 (the official code uses GELU: set "gelu").
- ``tie_word_embeddings``: True for the CPU presets; False for the MoLM presets, as in
  the published MoLM configs (and IBM's code). MoLM-4B-K2 then has 4.13B parameters and
  353M active per token (an untied input embedding counts one row per token), matching
  Table 1's "4B" and "350M".
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from modformer.models.gpt.configuration_gpt import apply_preset
from modformer.nn.activations import ACTIVATIONS
from modformer.nn.moe import ATTENTION_TYPES, EXPERT_MLPS, ROUTER_TYPES
from modformer.nn.norms import NORM_TYPES
from modformer.nn.routers import check_slot_lists

_MOLM = dict(
    vocab_size=50295,
    n_positions=2048,
    n_embd=1024,
    n_layer=24,
    n_att_experts=16,
    att_hidden=1024,
    n_head=1,
    n_ffd_experts=32,
    ffd_hidden=2048,
    k_att=2,
    k_ffd=2,
    router_hidden=256,
    use_history=True,  # sec. 5.1: keys/values of the previous batch are concatenated
    tie_word_embeddings=False,  # the published MoLM configs have a separate lm_head
)

# The CPU presets are sized against GPT's presets of the same width: the active attention
# heads (k_att * n_head of size att_hidden / n_head) and the active FFN width
# (k_ffd * ffd_hidden) equal GPT's (n_head heads, 4 * n_embd), so the per-token compute is
# comparable while the total parameter count is larger.
MODULEFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        n_embd=128,
        n_layer=4,
        n_att_experts=4,
        att_hidden=64,
        n_head=2,
        k_att=2,
        n_ffd_experts=8,
        ffd_hidden=256,
        k_ffd=2,
        router_hidden=64,
        n_positions=256,
    ),
    "small": dict(
        n_embd=256,
        n_layer=6,
        n_att_experts=8,
        att_hidden=128,
        n_head=2,
        k_att=2,
        n_ffd_experts=16,
        ffd_hidden=512,
        k_ffd=2,
        router_hidden=64,
        n_positions=512,
    ),
    "d512": dict(
        n_embd=512,
        n_layer=8,
        n_att_experts=8,
        att_hidden=256,
        n_head=4,
        k_att=2,
        n_ffd_experts=16,
        ffd_hidden=1024,
        k_ffd=2,
        router_hidden=128,
        n_positions=1024,
    ),
    "molm-4b-k2": dict(_MOLM),
    "molm-4b-k4": dict(_MOLM, k_att=4, k_ffd=4),
    "molm-8b-k2": dict(_MOLM, n_layer=48),
}

AUX_LOSS_TYPES = ("mi", "switch", "switch_pooled", "none")
TRAINABLE_SCOPES = (None, "inserted_experts", "inserted_experts+embeddings")
ROUTER_ACTIVATIONS = ("relu", "gelu")
UNBOUNDED_HISTORY = -1  # history_length: keep every remembered position


@strict
class ModuleFormerConfig(PreTrainedConfig):
    """ModuleFormer: MoA (stick-breaking attention experts) + SMoE blocks, no positions.

    Routing: ``k_att`` of ``n_att_experts`` attention experts and ``k_ffd`` of
    ``n_ffd_experts`` FFN experts per token, each chosen by a router
    ``TopK(softmax(A act(B x)))`` with ``B: router_hidden x n_embd``.

    Auxiliary losses (added to the LM loss when labels are given):
    ``aux_loss_weight * mean over routers of`` the MI loss (``aux_loss_type="mi"``,
    eq. 7) or Switch balance + ``switch_z_loss_coef`` * z-loss (``"switch"``), or nothing
    (``"none"``); ``load_concentration_weight * mean over routers of H(m)`` (eq. 8,
    fine-tuning); ``routing_reg_weight * sum over routers of ||A'||^2`` (eq. 10) where
    ``A'`` are the last ``n_inserted_att_experts`` / ``n_inserted_ffd_experts`` rows of
    each router's expert embedding (experts added for continual learning).

    Module surgery (`modformer.surgery`): ``att_experts_per_layer`` /
    ``ffd_experts_per_layer`` give each layer its own expert count (a pruned model);
    None means ``n_att_experts`` / ``n_ffd_experts`` in every layer. Each count must be
    at least the top-k. ``att_expert_slots`` / ``ffd_expert_slots`` (written by pruning)
    give, per layer, each kept expert's index among the ``n_att_experts`` /
    ``n_ffd_experts`` experts of the unpruned model: the routers compute their softmax at
    that layout (`modformer.nn.routers.RouterSlots`), so pruning experts that are never
    selected leaves the logits bit-identical. None: experts 0..n-1 of n.
    ``trainable_scope`` records which parameters training may change
    ("inserted_experts": the inserted experts and their rows A' only; with
    "+embeddings" also the token embedding, which the tied LM head shares; None: all);
    `modformer.models.trainable.apply_trainable_scope` sets ``requires_grad`` from it.

    History (Transformer-XL, sec. 3.2): with ``use_history`` the model returns the
    detached keys/values of the segment it just processed as ``memory``; passing it to
    the next call prepends it to every layer's keys/values. ``history_length`` caps the
    memory (None: exactly the previous segment; -1: unbounded, every call appends to all
    the memory it was given, as IBM's official code does with its cache).

    Options of IBM's official code (`modformer convert moduleformer` sets them; the
    defaults are the paper's): ``router_bias`` gives the router's first projection ``B``
    a bias (IBM's gate is ``Linear(bias) -> GELU -> Linear(no bias)``); ``kv_bias`` gives
    the shared ``W_k``/``W_v`` biases (they need real projections: ``att_hidden !=
    n_embd`` or ``n_head > 1``). IBM's aux loss is the *sum* over the ``2 * n_layer``
    routers, ours the mean: the same strength needs ``aux_loss_weight = 2 * n_layer *``
    IBM's weight (the importer converts it). IBM's LayerNorms use eps 1e-5 whatever its
    config says; the importer sets ``layer_norm_epsilon=1e-5``.

    ``n_positions`` is only the nominal context for generation: there are no position
    embeddings and stick-breaking attention has no length limit.

    JetMoE-style options (ModuleFormer's successor; `modformer convert jetmoe`). The
    defaults are ModuleFormer as above:

    - ``norm_type``: "layer" (LayerNorm) or "rms" (RMSNorm), every norm of the model;
      ``final_norm_epsilon`` is the last norm's eps (None: ``layer_norm_epsilon``; JetMoE
      fixes its block norms at 1e-6 and gives only the final one ``rms_norm_eps``).
    - ``expert_mlp``: "gelu" (``act(x W_1) W_2``, act = ``activation_function``) or
      "swiglu" (``(act(x W_g) * x W_u) W_2``; JetMoE uses act = "silu").
    - ``router_type``: "mlp" (eqs. 1-2, ``A act(B x)``, gates not renormalised) or
      "linear" (JetMoE: ``A x`` without bias, top-k of the logits, gates = softmax of
      the k kept logits); ``router_hidden`` / ``router_activation`` are unused then.
    - ``attention_type``: "stick_breaking" (sec. 3.2) or "softmax_rope" (causal softmax
      attention with rotary embeddings of base ``rope_theta`` on the full head_dim of
      every query head and the shared keys; positions count real tokens of the
      attention mask; the Table 4 baseline and JetMoE's attention).
    - ``moe_output_bias``: a (n_embd,) bias added to each MoA and SMoE output (JetMoE).
    - ``aux_loss_type="switch_pooled"``: JetMoE's balance loss, the Switch statistics
      pooled over all 2 * n_layer routers (`modformer.nn.moe_losses.pooled_switch_loss`).
    """

    model_type = "modformer_moduleformer"
    keys_to_ignore_at_inference = ["past_key_values", "memory"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 50295
    n_positions: int = 2048
    n_embd: int = 1024
    n_layer: int = 24
    n_att_experts: int = 16
    att_hidden: int = 1024
    n_head: int = 1
    k_att: int = 2
    n_ffd_experts: int = 32
    ffd_hidden: int = 2048
    k_ffd: int = 2
    router_hidden: int = 256
    router_activation: str = "relu"
    activation_function: str = "gelu_new"
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    aux_loss_type: str = "mi"
    aux_loss_weight: float = 0.01
    switch_z_loss_coef: float = 0.1
    load_concentration_weight: float = 0.0
    routing_reg_weight: float = 0.0
    n_inserted_att_experts: int = 0
    n_inserted_ffd_experts: int = 0
    att_experts_per_layer: list[int] | None = None
    ffd_experts_per_layer: list[int] | None = None
    att_expert_slots: list[list[int]] | None = None
    ffd_expert_slots: list[list[int]] | None = None
    trainable_scope: str | None = None
    router_bias: bool = False
    kv_bias: bool = False
    use_history: bool = False
    history_length: int | None = None
    attention_block_size: int = 128
    # JetMoE-style options (see the class docstring); the defaults are ModuleFormer's.
    norm_type: str = "layer"
    final_norm_epsilon: float | None = None
    expert_mlp: str = "gelu"
    router_type: str = "mlp"
    attention_type: str = "stick_breaking"
    rope_theta: float = 10000.0
    moe_output_bias: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> ModuleFormerConfig:
        """A named preset (case-insensitive, e.g. "tiny", "MoLM-4B-K2") plus overrides."""
        return cls(**apply_preset(MODULEFORMER_PRESETS, preset.lower(), overrides))

    @property
    def att_head_dim(self) -> int:
        return self.att_hidden // self.n_head

    def att_experts_in_layer(self, layer: int) -> int:
        """Attention experts of layer `layer` (per-layer counts of a pruned model)."""
        if self.att_experts_per_layer is None:
            return self.n_att_experts
        return self.att_experts_per_layer[layer]

    def ffd_experts_in_layer(self, layer: int) -> int:
        """FFN experts of layer `layer` (per-layer counts of a pruned model)."""
        if self.ffd_experts_per_layer is None:
            return self.n_ffd_experts
        return self.ffd_experts_per_layer[layer]

    def att_expert_slots_in_layer(self, layer: int) -> list[int] | None:
        """The kept attention experts' slots in layer `layer` (None: not pruned)."""
        return None if self.att_expert_slots is None else self.att_expert_slots[layer]

    def ffd_expert_slots_in_layer(self, layer: int) -> list[int] | None:
        """The kept FFN experts' slots in layer `layer` (None: not pruned)."""
        return None if self.ffd_expert_slots is None else self.ffd_expert_slots[layer]

    def validate_architecture(self):
        """Checked by `@strict` on construction; messages name the field."""
        positive = (
            "vocab_size",
            "n_positions",
            "n_embd",
            "n_layer",
            "n_att_experts",
            "att_hidden",
            "n_head",
            "k_att",
            "n_ffd_experts",
            "ffd_hidden",
            "k_ffd",
            "router_hidden",
            "attention_block_size",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.att_hidden % self.n_head != 0:
            raise ValueError(
                f"att_hidden ({self.att_hidden}) must be divisible by n_head ({self.n_head})"
            )
        for k_name, n_name, list_name, ins_name in (
            ("k_att", "n_att_experts", "att_experts_per_layer", "n_inserted_att_experts"),
            ("k_ffd", "n_ffd_experts", "ffd_experts_per_layer", "n_inserted_ffd_experts"),
        ):
            k, inserted = getattr(self, k_name), getattr(self, ins_name)
            per_layer = getattr(self, list_name)
            if per_layer is None:
                counts = {n_name: getattr(self, n_name)}
            else:
                if len(per_layer) != self.n_layer:
                    raise ValueError(
                        f"{list_name} has {len(per_layer)} entries but the model has "
                        f"n_layer={self.n_layer} layers; give one expert count per layer"
                    )
                counts = {f"{list_name}[{i}]": n for i, n in enumerate(per_layer)}
            for name, n in counts.items():
                if k > n:
                    raise ValueError(
                        f"{k_name} ({k}) must be <= {name} ({n}): a token cannot pick more "
                        f"experts than exist"
                    )
                if not 0 <= inserted <= n:
                    raise ValueError(
                        f"{ins_name} ({inserted}) must be between 0 and {name} ({n}): it "
                        f"counts the last experts of each layer"
                    )
        for slots_name, list_name, n_name in (
            ("att_expert_slots", "att_experts_per_layer", "n_att_experts"),
            ("ffd_expert_slots", "ffd_experts_per_layer", "n_ffd_experts"),
        ):
            if getattr(self, slots_name) is None:
                continue
            if getattr(self, list_name) is None:
                raise ValueError(f"{slots_name} needs {list_name} (a pruned model's counts)")
            width = getattr(self, n_name)
            check_slot_lists(
                slots_name,
                getattr(self, slots_name),
                getattr(self, list_name),
                [width] * self.n_layer,
            )
        if self.trainable_scope not in TRAINABLE_SCOPES:
            raise ValueError(
                f"trainable_scope {self.trainable_scope!r} is unknown; choose one of "
                f"{list(TRAINABLE_SCOPES)} (None: every parameter is trained)"
            )
        if self.router_activation not in ROUTER_ACTIVATIONS:
            raise ValueError(
                f"router_activation {self.router_activation!r} is unknown; choose one of "
                f"{list(ROUTER_ACTIVATIONS)} (relu: paper eq. 2, gelu: official code)"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is unknown; "
                f"choose one of {sorted(ACTIVATIONS)}"
            )
        if self.aux_loss_type not in AUX_LOSS_TYPES:
            raise ValueError(
                f"aux_loss_type {self.aux_loss_type!r} is unknown; choose one of "
                f"{list(AUX_LOSS_TYPES)}"
            )
        for name in (
            "aux_loss_weight",
            "switch_z_loss_coef",
            "load_concentration_weight",
            "routing_reg_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        history = self.history_length
        if history is not None and history <= 0 and history != UNBOUNDED_HISTORY:
            raise ValueError(
                f"history_length must be positive, None (the whole previous segment) or "
                f"{UNBOUNDED_HISTORY} (unbounded), got {history}"
            )
        if self.kv_bias and self.att_hidden == self.n_embd and self.n_head == 1:
            raise ValueError(
                "kv_bias=True needs K/V projections, but with att_hidden == n_embd and "
                "n_head=1 the keys/values are the identity; set kv_bias=False (IBM's code "
                "has no K/V biases in this layout either)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, choices in (
            ("norm_type", NORM_TYPES),
            ("expert_mlp", EXPERT_MLPS),
            ("router_type", ROUTER_TYPES),
            ("attention_type", ATTENTION_TYPES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} {getattr(self, name)!r} is unknown; choose one of {list(choices)}"
                )
        if self.router_bias and self.router_type != "mlp":
            raise ValueError(
                f"router_bias=True biases the router's first projection B, which the "
                f"{self.router_type!r} router does not have; use router_type='mlp' or "
                f"router_bias=False"
            )
        if self.final_norm_epsilon is not None and self.final_norm_epsilon <= 0:
            raise ValueError(
                f"final_norm_epsilon must be positive or None (None = layer_norm_epsilon), "
                f"got {self.final_norm_epsilon}"
            )
        if self.aux_loss_type == "switch_pooled":
            # A pruned router counts at its unpruned width (n_*_experts), others at theirs.
            widths = {
                self.n_att_experts if self.att_expert_slots else self.att_experts_in_layer(i)
                for i in range(self.n_layer)
            } | {
                self.n_ffd_experts if self.ffd_expert_slots else self.ffd_experts_in_layer(i)
                for i in range(self.n_layer)
            }
            if len(widths) != 1:
                raise ValueError(
                    f"aux_loss_type 'switch_pooled' (JetMoE) pools the statistics of all "
                    f"routers, which needs one expert count, but the routers have "
                    f"{sorted(widths)}; use 'switch' for different counts"
                )
        if self.attention_type == "softmax_rope":
            if self.att_head_dim % 2 != 0:
                raise ValueError(
                    f"attention_type 'softmax_rope' rotates pairs of dimensions: the head "
                    f"size att_hidden / n_head = {self.att_head_dim} must be even"
                )
            if self.rope_theta <= 0:
                raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
