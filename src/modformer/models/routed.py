"""What every routed causal LM tells the code outside `models/` (design §6).

A routed model is made of *pools*: sets of interchangeable choices one router picks
from. A ModuleFormer layer has two (its attention experts and its FFN experts), a MoM
chunk has two (its attention modules and its FFN modules, picked again at each of the
chunk's H steps). `RoutedModel` is the protocol each routed family implements inside its
own package; usage statistics, routing reports, pruning and expert insertion loop over
`routed_pools()` and never ask which family a model is:

- `routed_pools()`: one `RoutedPool` per pool, in model order (layer / chunk, then
  attention before FFN): its name (the usage key), kind (``"attn"`` / ``"ffn"``),
  number of choices, whether SKIP is a choice, labels, and the state-dict entries whose
  rows belong to its choices (a declarative key map for surgery);
- `routing_decisions(input_ids, attention_mask)`: one forward pass, its decisions per
  pool and step as `PoolDecision`s (the `RoutingDecision` type of `modformer.nn.routing`);
- `pool_config_fields`: the config fields that hold each kind's per-pool choice counts
  and router slots, so a model keeping a subset of its choices is one config change;
- `check_prunable()` and, for families that can grow pools (ModuleFormer's expert
  insertion, sec. 4.3), `inserted_parameter_pairs()` and `config_with_new_choices()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modformer.nn.routing import RoutingDecision

ATTN, FFN = "attn", "ffn"
POOL_KINDS = (ATTN, FFN)
# Names older versions used for ModuleFormer's pools (saved usage files may hold them).
_OLD_KIND_NAMES = {"att": ATTN, "ffd": FFN}


def canonical_pool_key(key: str) -> str:
    """A usage key with an old kind name ("layer0/att", "layer0/ffd") in today's
    vocabulary ("layer0/attn", "layer0/ffn"); other keys unchanged."""
    head, _, kind = key.rpartition("/")
    if head and kind in _OLD_KIND_NAMES:
        return f"{head}/{_OLD_KIND_NAMES[kind]}"
    return key


@dataclass(frozen=True)
class StackedParameter:
    """A state-dict entry whose rows (dim 0) are the pool's choices in order; the
    ``extra_rows`` rows after them (a router's SKIP row) belong to no choice."""

    key: str
    extra_rows: int = 0


@dataclass(frozen=True)
class RoutedPool:
    """One pool of choices a router picks from.

    name: the pool's usage key, ``"{group}{index}/{kind}"`` ("layer3/ffn", "chunk0/attn").
    group / index: where it sits ("layer" l of a ModuleFormer, "chunk" c of a MoM).
    steps / per_step: decisions per forward pass, and whether each step is counted on
        its own (MoM re-routes at each of a chunk's H steps: usage keys
        ``chunk{c}/step{h}/{kind}``, and step-to-step transitions).
    label_prefix / choice_name: how the choices are shown ("E" experts, "M" modules).
    min_keep: the fewest choices pruning may leave (top-k must stay possible).
    stacked: the state-dict entries stacked by choice (weights and router rows).
    slots: each choice's slot in the unpruned router (None: choice i is slot i).
    """

    name: str
    kind: str
    group: str
    index: int
    num_choices: int
    has_skip: bool
    label_prefix: str
    choice_name: str
    min_keep: int
    steps: int = 1
    per_step: bool = False
    stacked: tuple[StackedParameter, ...] = ()
    slots: tuple[int, ...] | None = None

    def decision_key(self, step: int) -> str:
        """The usage key of this pool's decisions at `step`."""
        if self.per_step:
            return f"{self.group}{self.index}/step{step}/{self.kind}"
        return self.name

    def kept_slots(self, kept: Sequence[int]) -> list[int]:
        """The unpruned router slots of the `kept` choices."""
        slots = range(self.num_choices) if self.slots is None else self.slots
        return [slots[i] for i in kept]


def choice_labels(prefix: str, num_columns: int, skip: bool) -> list[str]:
    """Column names of a pool's usage: ``{prefix}0..``, SKIP last when it is a choice."""
    labels = [f"{prefix}{i}" for i in range(num_columns)]
    if skip and labels:
        labels[-1] = "SKIP"
    return labels


@dataclass
class PoolDecision:
    """One decision of a forward pass: `decision` (flat: (n, k) picks over the n = B*T
    tokens) was made by `pool` at chunk step `step` (0 for a ModuleFormer layer)."""

    pool: RoutedPool
    step: int
    decision: RoutingDecision

    @property
    def key(self) -> str:
        return self.pool.decision_key(self.step)


def kept_choices_config(
    pools: Sequence[RoutedPool],
    kept: Mapping[str, Sequence[int]],
    fields: Mapping[str, tuple[str, str]],
) -> dict[str, Any]:
    """Config changes for a model that keeps, of every pool, the choices `kept[pool.name]`:
    per kind, the per-pool counts and the kept choices' unpruned router slots, written to
    the (counts field, slots field) pair `fields[kind]`."""
    changes: dict[str, Any] = {}
    for kind, (counts_field, slots_field) in fields.items():
        of_kind = [pool for pool in pools if pool.kind == kind]
        changes[counts_field] = [len(kept[pool.name]) for pool in of_kind]
        changes[slots_field] = [pool.kept_slots(kept[pool.name]) for pool in of_kind]
    return changes


class RoutedModel(ABC):
    """Mixin of the routed causal LMs (see the module docstring).

    ``routing_family``: the name usage statistics and reports record ("moduleformer",
    "mom"). ``pool_config_fields``: kind -> (config field of the per-pool choice counts,
    config field of the per-pool router slots).
    """

    routing_family: str = ""
    pool_config_fields: dict[str, tuple[str, str]] = {}

    # The protocol's required part: each family's mixin (models/<family>/routing.py)
    # implements these; a class that forgets one cannot be instantiated.

    @abstractmethod
    def routed_pools(self) -> list[RoutedPool]:
        """Every routed pool of the model, in forward order."""

    @abstractmethod
    def routing_decisions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[PoolDecision]:
        """One forward pass without a cache: every routed decision, per pool and step."""

    def check_prunable(self) -> None:  # noqa: B027  (an optional hook, not abstract)
        """Raise a ValueError naming the reason when pools cannot lose choices (by default
        every pool can)."""

    def config_keeping(self, kept: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        """Config changes for keeping the choices `kept[pool name]` of every pool."""
        return kept_choices_config(self.routed_pools(), kept, self.pool_config_fields)

    # ---- growing pools (expert insertion) -------------------------------------------------

    supports_insertion: bool = False

    def inserted_parameter_pairs(self) -> list[tuple[str, str]]:
        """(original key, inserted key) state-dict pairs: the inserted choices' rows are
        appended to the original tensor when they become ordinary choices."""
        return []

    def config_with_new_choices(self, new_per_kind: Mapping[str, int]) -> dict[str, Any]:
        """Config changes adding `new_per_kind[kind]` inserted choices to every pool."""
        raise ValueError(f"{type(self).__name__} cannot insert new choices into its pools")

    def config_merging_inserted(self) -> dict[str, Any]:
        """Config changes that make the inserted choices ordinary ones."""
        return {}
