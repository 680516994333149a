"""Configuration of Mixture-of-Modules (design §2; MoM paper sec. 3-4, appendices A, B, D).

A MoM model is a GPT-2 whose layers are grouped by a chunk string such as
``[1-1-4-1-4-1]``: a ``1`` is a fixed standard block, an ``N`` is a chunk of ``N``
attention and ``N`` FFN modules assembled for ``H`` steps with top-``K`` routing. The
shorthand ``KaHb`` (trailing ``S``: SKIP is a choice) sets ``K``, ``H`` and ``skip``
together: ``MoMConfig.from_preset("small", mom="K2H6S")``.

Choices the paper leaves open, and where they come from:

- ``router_dim``: 256, the GRU state size (and MLP-router hidden size) of the official
  code (``router_dim``).
- The routers see the raw residual stream (``x_h`` for attention, ``u_h`` for the FFN),
  as in eq. 7 and the official code; each module applies its own LayerNorm afterwards.
- ``balance_loss_weight``: the official code's depth-wise Switch balance loss uses 0.01;
  the paper found it hurts, so the default is 0 (off).
- ``mom_same``: the MoM-same ablation (Table 2) "forces" a chunk's modules to be
  identical. We tie them (one stored attention and one stored FFN module per chunk that
  every router choice uses), so they stay identical during training; the router still
  picks among N choices (and SKIP), so K copies of the module are summed when K > 1.

Fixed policies (sec. 3.5) replace the learned routers by a rule; their parameters:

- ``vanilla``: step h runs module h with weight 1. Needs ``H == N`` for every chunk.
- ``layer_skip``: step h runs module h, or SKIP (attention and FFN) at the assembled
  layers listed in ``skip_layers``, or for the tokens a runtime criterion picks
  (``MoMModel.set_skip_criterion``). Needs ``H == N``.
- ``early_exit``: as ``layer_skip``, but once a token skips it skips every later chunk
  step (fixed ``1`` blocks still run: use a single chunk such as ``[12]`` for classic
  early exit). Needs ``H == N``.
- ``parameter_sharing``: step h runs module ``share_map[h]`` (a list of H indices < N).
- ``moe``: attention step h runs module h; the FFN of step h is top-K over
  ``num_experts`` experts private to step h (a pool of H * num_experts FFNs), with a
  Mixtral-style linear router per step. Needs ``H == N``; ``skip`` must be off.
- ``moe_share``: as ``moe`` but all steps share one pool of ``num_experts`` FFN experts
  (default N: the chunk's own FFNs, so the parameter count equals the vanilla model's).

Pruned pools (MoM paper Figure 3's N_A x N_F study; `modformer.surgery.prune_model`):
``attn_modules_per_chunk`` / ``ffn_modules_per_chunk`` give each chunk (in chunk-string
order, fixed ``1`` blocks not counted) its own number of attention / FFN modules; None
means N for every chunk. Only the learned policy supports them, and K must not exceed a
pruned chunk's choices (its modules, plus SKIP when on). ``attn_module_slots`` /
``ffn_module_slots`` give, per chunk, each kept module's index in the unpruned pool: the
router computes its logits at the unpruned layout (`modformer.nn.routers.RouterSlots`),
so pruning never-selected modules leaves the logits bit-identical. None: 0..n-1.

Router width (``router_width``): ``"pool"`` (default) gives each router one choice per
module of its pool (plus SKIP). ``"chunk"`` is the official MoM code's layout for
``num_attn != num_ffn``: both routers of a chunk of size N score N choices (plus SKIP)
whatever their pool's size, and a choice at or above a smaller pool's size picks no
module (it acts as SKIP, and takes its share of the renormalised weights). Write N as
max(N_A, N_F) in the chunk string and the pool sizes in ``attn_modules_per_chunk`` /
``ffn_modules_per_chunk``. It needs the learned policy, SKIP on, and an unpruned model
(no ``*_module_slots``; such a model cannot be pruned).

Router outputs (learned routers and the MoE gates; the official MoM code's ``router_type``
and ``router_softmax_temperature``):

- ``router_temperature`` T: routing weights come from ``softmax(logits / T)`` (the
  official pretraining script uses T = 0.2). It changes the weights, not the top-K picks.
  With ``renormalize`` the kept weights are ``softmax(kept logits / T)``.
- ``router_output``: ``"softmax"`` (default) or ``"logits"``, the official routers without
  "softmax" in their type: the raw top-K logits are the weights, unnormalised and possibly
  negative. It needs ``renormalize=False`` and T = 1 (neither applies to raw logits);
  ``RoutingDecision.probs`` (balance loss, loads) is still ``softmax(logits)``.

All-SKIP tokens (``all_skip_tokens``): a token whose K picks are all SKIP at an attention
step (K = 1 with SKIP, or the layer_skip / early_exit policies) has no q, k, v there and
no output (the residual passes through). ``"drop"`` (default, design §2) also removes it
from that step's keys, so later tokens attend only to tokens that ran a module; the KV
cache then holds a "is a key" flag layer per chunk step. ``"zero_key"`` is the official
MoM code's behaviour: the token stays in the keys with k = v = 0, so every later query
sees it with score 0 and value 0 (it takes softmax mass, and the logits differ from
"drop" by order 1); no flag layers are needed. The option matters only when a token can
pick SKIP alone.

Separate top-K per router type (MoM paper Fig. 3, which sets K to each pool's size):
``K_attn`` / ``K_ffn`` are the attention / FFN routers' K (None: ``K``; `attn_k` and
`ffn_k` resolve them). Only the learned policy has them.

``K`` and ``skip`` are ignored by the policies that pick one module per step (vanilla,
layer_skip, early_exit, parameter_sharing). Layer numbers (``skip_layers``, the routing
trace) count assembled layers: fixed blocks and chunk steps in order, so with ``H == N``
they are the layer numbers of the vanilla model the MoM was converted from.
"""

from __future__ import annotations

import re
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from modformer.models.gpt.configuration_gpt import apply_preset
from modformer.nn.activations import ACTIVATIONS
from modformer.nn.routers import check_slot_lists

POLICIES = (
    "learned",
    "vanilla",
    "layer_skip",
    "early_exit",
    "parameter_sharing",
    "moe",
    "moe_share",
)
# Policies whose step h uses module h (of attention, and of FFN unless MoE): H must be N.
STEP_IS_MODULE_POLICIES = ("vanilla", "layer_skip", "early_exit", "moe", "moe_share")
ROUTERS = ("gru", "mlp")
ROUTER_OUTPUTS = ("softmax", "logits")
ALL_SKIP_TOKENS = ("drop", "zero_key")
ROUTER_WIDTHS = ("pool", "chunk")

_CHUNKS_SYNTAX = re.compile(r"^\[\s*[1-9]\d*\s*(-\s*[1-9]\d*\s*)*\]$")
_MOM_NAME_SYNTAX = re.compile(r"^K(\d+)H(\d+)(S?)$")

# Paper presets (appendix A) with GPT-2 small/medium/large shapes; `tiny` matches
# GPTConfig's tiny preset (4 layers) so phase 2 can start from a tiny vanilla model, and
# `d512` is the 8-layer model of appendix B with the paper's [1-1-4-1-1] chunking.
MOM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_embd=128, n_head=4, n_positions=256, chunks="[1-2-1]", K=2, H=2, router_dim=64),
    "d512": dict(n_embd=512, n_head=8, n_positions=1024, chunks="[1-1-4-1-1]", K=2, H=4),
    "small": dict(n_embd=768, n_head=12, n_positions=1024, chunks="[1-1-4-1-4-1]"),
    "medium": dict(n_embd=1024, n_head=16, n_positions=1024, chunks="[1-1-1-4-1-4-1-4-1-4-1-1]"),
    "large": dict(
        n_embd=1280, n_head=20, n_positions=1024, chunks="[1-4-1-4-1-4-1-4-1-4-1-4-1-4-1]"
    ),
}


def default_chunks(n_layer: int) -> str:
    """The preset chunk string for a vanilla model of `n_layer` layers (paper appendix A
    for 12/24/36 layers; our tiny and d512 presets for 4/8)."""
    for preset in MOM_PRESETS.values():
        if sum(parse_chunks(preset["chunks"])) == n_layer:
            return preset["chunks"]
    raise ValueError(
        f"no preset chunk string covers {n_layer} layers; pass chunks explicitly, "
        "e.g. '[1-4-1]' for 6 layers"
    )


def parse_chunks(chunks: str) -> list[int]:
    """'[1-1-4-1-1]' -> [1, 1, 4, 1, 1]; bad syntax raises a ValueError naming the field."""
    if not isinstance(chunks, str) or not _CHUNKS_SYNTAX.match(chunks):
        raise ValueError(
            f"chunks={chunks!r} is not a chunk string: write positive integers joined by '-' "
            "inside brackets, e.g. '[1-1-4-1-1]' (1 = fixed block, N = chunk of N modules)"
        )
    return [int(part) for part in chunks.strip()[1:-1].split("-")]


def parse_mom_name(name: str) -> tuple[int, int, bool]:
    """'K2H6S' -> (K=2, H=6, skip=True)."""
    match = _MOM_NAME_SYNTAX.match(name)
    if match is None:
        raise ValueError(
            f"mom={name!r} is not a MoM name: write K<top-k>H<steps>, with a trailing S to "
            "include SKIP, e.g. 'K2H6S' (MoM_P), 'K3H2S' (MoM_I), 'K3H1S' (MoM_E)"
        )
    return int(match.group(1)), int(match.group(2)), match.group(3) == "S"


@strict
class MoMConfig(PreTrainedConfig):
    """GPT-2 shape plus the MoM tuple <M, R, phi, K, H> (see the module docstring)."""

    model_type = "modformer_mom"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
    }

    # GPT-2 shape (same meaning as GPTConfig).
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bias: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    # MoM structure.
    chunks: str = "[1-1-4-1-4-1]"
    mom: str | None = None  # shorthand "KaHb[S]"; consumed at construction into K, H, skip
    K: int = 2
    K_attn: int | None = None  # the attention routers' top-K (None: K)
    K_ffn: int | None = None  # the FFN routers' top-K (None: K)
    H: int = 6
    skip: bool = True
    router: str = "gru"
    router_dim: int = 256
    renormalize: bool = True
    router_temperature: float = 1.0
    router_output: str = "softmax"
    all_skip_tokens: str = "drop"
    router_width: str = "pool"
    weighted_qkv: bool = False
    mom_same: bool = False
    balance_loss_weight: float = 0.0
    attn_modules_per_chunk: list[int] | None = None
    ffn_modules_per_chunk: list[int] | None = None
    attn_module_slots: list[list[int]] | None = None
    ffn_module_slots: list[list[int]] | None = None

    # Assembly policy and its parameters.
    policy: str = "learned"
    skip_layers: list[int] | None = None
    share_map: list[int] | None = None
    num_experts: int | None = None

    def __post_init__(self, **kwargs):
        if self.mom is not None:
            self.K, self.H, self.skip = parse_mom_name(self.mom)
            # K, H and skip are the stored truth; dropping the shorthand keeps a saved
            # config from overriding later edits of K/H/skip when it is loaded again.
            self.mom = None
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> MoMConfig:
        return cls(**apply_preset(MOM_PRESETS, preset, overrides))

    # ---- derived structure -------------------------------------------------------------

    @property
    def mom_name(self) -> str:
        """A label such as K2H6S; with separate router K, e.g. K(A1,F4)H4S."""
        k = str(self.K)
        if self.K_attn is not None or self.K_ffn is not None:
            k = f"(A{self.attn_k},F{self.ffn_k})"
        return f"K{k}H{self.H}{'S' if self.skip else ''}"

    @property
    def attn_k(self) -> int:
        """Top-K of the attention routers."""
        return self.K if self.K_attn is None else self.K_attn

    @property
    def ffn_k(self) -> int:
        """Top-K of the FFN routers."""
        return self.K if self.K_ffn is None else self.K_ffn

    @property
    def d_inner(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def chunk_sizes(self) -> list[int]:
        """The chunk string as numbers: 1 = fixed block, N > 1 = chunk of N modules."""
        return parse_chunks(self.chunks)

    @property
    def num_vanilla_layers(self) -> int:
        """Layers of the vanilla model this MoM is initialised from (modules per type)."""
        return sum(self.chunk_sizes)

    @property
    def num_attention_layers(self) -> int:
        """Assembled depth: one per fixed block plus H per chunk."""
        return sum(1 if n == 1 else self.H for n in self.chunk_sizes)

    @property
    def attention_may_skip_all(self) -> bool:
        """Whether a token may select only SKIP at an attention step and is then masked
        out of that step's keys (and needs a key-flag layer in the KV cache). Never with
        `all_skip_tokens="zero_key"`: such tokens stay keys (k = v = 0)."""
        if self.all_skip_tokens == "zero_key":
            return False
        if self.policy == "learned":
            if self.router_width == "chunk":  # choices beyond a smaller pool pick nothing
                sizes = [n for n in self.chunk_sizes if n > 1]
                return any(
                    n - self.learned_pool_sizes(c, n)[0] + int(self.skip) >= self.attn_k
                    for c, n in enumerate(sizes)
                )
            return self.skip and self.attn_k == 1  # with K >= 2 some pick is always a module
        return self.policy in ("layer_skip", "early_exit")

    @property
    def num_hidden_layers(self) -> int:
        """KV-cache layers: one per assembled attention layer, plus (when a token may skip
        a whole attention step) one per chunk step holding which positions are keys.
        `generate()` sizes its `DynamicCache` from this."""
        chunk_steps = sum(self.H for n in self.chunk_sizes if n > 1)
        return self.num_attention_layers + (chunk_steps if self.attention_may_skip_all else 0)

    def learned_pool_sizes(self, chunk_index: int, num_modules: int) -> tuple[int, int]:
        """(attention, FFN) modules of the learned policy's chunk `chunk_index` (counted
        over chunks only) of `num_modules` modules: N, unless pruned."""
        attn = self.attn_modules_per_chunk
        ffn = self.ffn_modules_per_chunk
        return (
            num_modules if attn is None else attn[chunk_index],
            num_modules if ffn is None else ffn[chunk_index],
        )

    def learned_pool_slots(self, chunk_index: int) -> tuple[list[int] | None, list[int] | None]:
        """(attention, FFN) slots of the kept modules of a pruned chunk (None: unpruned)."""
        attn, ffn = self.attn_module_slots, self.ffn_module_slots
        return (
            None if attn is None else attn[chunk_index],
            None if ffn is None else ffn[chunk_index],
        )

    # ---- validation (run by @strict on construction; messages name the field) ----------

    def validate_architecture(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_head", "K", "H", "router_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("K_attn", "K_ffn"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or self.policy != "learned"):
                raise ValueError(
                    f"{name}={value}: a separate top-K must be positive and is a parameter of "
                    f"the learned policy's routers (policy {self.policy!r}); leave it None to use K"
                )
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and self.n_inner <= 0:
            raise ValueError(f"n_inner must be positive or None, got {self.n_inner}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is unknown; "
                f"choose one of {sorted(ACTIVATIONS)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.router not in ROUTERS:
            raise ValueError(f"router {self.router!r} is unknown; choose one of {list(ROUTERS)}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} is unknown; choose one of {list(POLICIES)}")
        if self.router_output not in ROUTER_OUTPUTS:
            raise ValueError(
                f"router_output {self.router_output!r} is unknown; choose one of "
                f"{list(ROUTER_OUTPUTS)}"
            )
        if self.all_skip_tokens not in ALL_SKIP_TOKENS:
            raise ValueError(
                f"all_skip_tokens {self.all_skip_tokens!r} is unknown; choose one of "
                f"{list(ALL_SKIP_TOKENS)}"
            )
        if self.router_width not in ROUTER_WIDTHS:
            raise ValueError(
                f"router_width {self.router_width!r} is unknown; choose one of "
                f"{list(ROUTER_WIDTHS)}"
            )
        if not self.router_temperature > 0:
            raise ValueError(
                f"router_temperature must be > 0 (weights are softmax(logits / T)), got "
                f"{self.router_temperature}"
            )
        if self.router_output == "logits" and (self.renormalize or self.router_temperature != 1):
            raise ValueError(
                "router_output='logits' uses the raw top-K logits as weights; set "
                f"renormalize=False and router_temperature=1.0 (got renormalize="
                f"{self.renormalize}, router_temperature={self.router_temperature})"
            )
        if self.balance_loss_weight < 0:
            raise ValueError(f"balance_loss_weight must be >= 0, got {self.balance_loss_weight}")
        if self.num_experts is not None and self.num_experts <= 0:
            raise ValueError(f"num_experts must be positive or None, got {self.num_experts}")
        sizes = self.chunk_sizes  # raises on bad syntax
        chunk_sizes = [n for n in sizes if n > 1]
        if self.mom_same and self.policy != "learned":
            raise ValueError(
                f"mom_same ties a chunk's modules for learned routing; it does not apply to "
                f"policy {self.policy!r}"
            )
        for name in ("attn_modules_per_chunk", "ffn_modules_per_chunk"):
            per_chunk = getattr(self, name)
            if per_chunk is None:
                continue
            if self.policy != "learned" or self.mom_same:
                raise ValueError(
                    f"{name} (pruned module pools) needs the learned policy without mom_same; "
                    f"got policy {self.policy!r}, mom_same={self.mom_same}"
                )
            if len(per_chunk) != len(chunk_sizes) or any(n < 1 for n in per_chunk):
                raise ValueError(
                    f"{name}={per_chunk} must give one positive module count per chunk; "
                    f"chunks={self.chunks!r} has {len(chunk_sizes)} chunks"
                )
        for slots_name, counts_name in (
            ("attn_module_slots", "attn_modules_per_chunk"),
            ("ffn_module_slots", "ffn_modules_per_chunk"),
        ):
            if getattr(self, slots_name) is not None and getattr(self, counts_name) is None:
                raise ValueError(f"{slots_name} needs {counts_name} (a pruned model's sizes)")
            counts = getattr(self, counts_name) or chunk_sizes
            check_slot_lists(slots_name, getattr(self, slots_name), counts, chunk_sizes)
        if self.router_width == "chunk":
            if (
                self.policy != "learned"
                or not self.skip
                or self.mom_same
                or self.attn_module_slots is not None
                or self.ffn_module_slots is not None
            ):
                raise ValueError(
                    "router_width='chunk' (routers score the chunk's N choices whatever the "
                    "pool size, as the official MoM code) needs the learned policy with "
                    "skip=True, without mom_same, and an unpruned model (no "
                    f"attn/ffn_module_slots); got policy={self.policy!r}, skip={self.skip}, "
                    f"mom_same={self.mom_same}"
                )
            for c, size in enumerate(chunk_sizes):
                if max(self.learned_pool_sizes(c, size)) > size:
                    raise ValueError(
                        f"router_width='chunk' needs at most N modules per pool, but chunk {c} "
                        f"(N={size} in chunks={self.chunks!r}) has pools "
                        f"{self.learned_pool_sizes(c, size)}; write N = max(N_A, N_F)"
                    )
        if self.policy == "learned":
            for c, size in enumerate(chunk_sizes):
                pools = zip(
                    ("attention", "FFN"),
                    self.learned_pool_sizes(c, size),
                    (("K_attn", self.attn_k), ("K_ffn", self.ffn_k)),
                )
                for kind, n, (k_name, k) in pools:
                    if self.router_width == "chunk":
                        n = size  # every router of the chunk scores N choices
                    limit = n + 1 if self.skip else n
                    if limit < k:
                        choices = f"{n} modules + SKIP" if self.skip else f"{n} modules"
                        where = (
                            f"a chunk of size {size} in chunks={self.chunks!r}; lower K"
                            if n == size
                            else f"chunk {c}'s pruned {kind} pool; lower K or keep more modules"
                        )
                        name = "K" if getattr(self, k_name) is None else k_name
                        raise ValueError(
                            f"{name}={k} exceeds the {limit} choices ({choices}) of {kind} "
                            f"routing in {where}"
                        )
        if self.policy in STEP_IS_MODULE_POLICIES:
            for n in chunk_sizes:
                if n != self.H:
                    raise ValueError(
                        f"policy {self.policy!r} runs module h at step h, so H must equal every "
                        f"chunk's size; got H={self.H} and a chunk of {n} in "
                        f"chunks={self.chunks!r}"
                    )
        if self.policy in ("moe", "moe_share"):
            if self.skip:
                raise ValueError(
                    f"policy {self.policy!r} has no SKIP module; set skip=False (a MoM name "
                    "without the trailing S, e.g. 'K2H4')"
                )
            for n in chunk_sizes:
                experts = self.num_experts if self.num_experts is not None else n
                if experts < self.K:
                    raise ValueError(
                        f"K={self.K} exceeds num_experts={experts} of policy {self.policy!r}"
                    )
        if self.policy in ("layer_skip", "early_exit"):
            chunk_layers = self.chunk_layer_indices()
            for layer in self.skip_layers or []:
                if layer not in chunk_layers:
                    raise ValueError(
                        f"skip_layers names layer {layer}, which is not a chunk step; chunk "
                        f"steps of chunks={self.chunks!r} are layers {sorted(chunk_layers)}"
                    )
        elif self.skip_layers:
            raise ValueError(
                f"skip_layers is a parameter of the layer_skip/early_exit policies, "
                f"not of policy {self.policy!r}"
            )
        if self.policy == "parameter_sharing":
            if self.share_map is None or len(self.share_map) != self.H:
                raise ValueError(
                    f"policy 'parameter_sharing' needs share_map, a list of H={self.H} module "
                    f"indices (step h uses module share_map[h]), got {self.share_map!r}"
                )
            for n in chunk_sizes:
                if any(not 0 <= m < n for m in self.share_map):
                    raise ValueError(
                        f"share_map={self.share_map} names a module outside [0, {n}) of a "
                        f"chunk of size {n} in chunks={self.chunks!r}"
                    )
        elif self.share_map is not None:
            raise ValueError(
                f"share_map is a parameter of policy 'parameter_sharing', not of {self.policy!r}"
            )

    def chunk_layer_indices(self) -> set[int]:
        """Assembled layer numbers that are chunk steps (not fixed blocks)."""
        layers, layer = set(), 0
        for n in self.chunk_sizes:
            steps = 1 if n == 1 else self.H
            if n > 1:
                layers.update(range(layer, layer + steps))
            layer += steps
        return layers
