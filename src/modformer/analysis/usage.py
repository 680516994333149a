"""Module usage statistics: how often each module/expert is picked, per layer or chunk step.

This is the activation frequency ``f_m`` of ModuleFormer sec. 5.3 (how often expert m is
in a token's top-k, counted over the real tokens of a data set, then normalised within
each layer by the max (default) or the sum) and the module loads / routing paths of MoM
(paper Figure 6). Pruning (`modformer.surgery`) and the routing reports
(`routing_report.py`) both start from a `UsageStats`.

Counting loops over the model's routed pools (`modformer.models.routed`), the same code
for every family. Keys of ``UsageStats.counts`` (each a (num_choices,) int64 tensor) are
the decisions' keys:

- ModuleFormer: ``layer{l}/attn`` (attention experts) and ``layer{l}/ffn`` (FFN experts);
  files written by older versions say ``att`` / ``ffd`` and are read under today's names.
- MoM: ``chunk{c}/step{h}/attn`` and ``chunk{c}/step{h}/ffn``; ``num_choices`` is the
  pool size, plus one when the chunk can SKIP (the learned policy with SKIP, or the
  layer-skip / early-exit policies), and then SKIP is the last entry. Fixed ``1`` blocks
  are not listed: every token runs their one attention and one FFN.

``transitions`` (pools decided again at every step, MoM): ``chunk{c}/attn`` /
``chunk{c}/ffn`` -> (H-1, C, C) int64, entry ``[h, i, j]`` = how many times a token picked
choice i at step h and choice j at step h+1, counted over all K x K pairs of its picks
(so one token adds K^2 per step pair).

Counting stays on the model's device (``scatter_add_`` on int64, no host syncs per
batch); the tensors are moved to the CPU once at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modformer.defaults import NORMS
from modformer.models.routed import POOL_KINDS, RoutedModel, canonical_pool_key, choice_labels
from modformer.nn.routing import RoutingDecision

# How older usage files (without label fields) name the choices of each family.
_LEGACY_LABELS = {"moduleformer": ("E", "expert"), "mom": ("M", "module")}


class UsageError(ValueError):
    """Usage statistics cannot be collected or read; the message says why and the fix."""


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise UsageError(
            f"norm must be 'max' (divide by the most used module, ModuleFormer's default) or "
            f"'sum' (divide by the total), got {norm!r}"
        )


def normalize(counts: torch.Tensor, norm: str = "max") -> torch.Tensor:
    """Counts -> fp32 frequencies divided by their max or sum (all zeros stay zeros)."""
    _check_norm(norm)
    counts = counts.to(torch.float32)
    scale = counts.max() if norm == "max" else counts.sum()
    if scale <= 0:
        return torch.zeros_like(counts)
    return counts / scale


def _canonical_keys(table: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if table is None else {canonical_pool_key(k): v for k, v in table.items()}


@dataclass
class UsageStats:
    """Selection counts of every routed decision of a model on some data.

    ``arch``: the model's routing family ("moduleformer", "mom"). ``counts``: key ->
    (num_choices,) int64 (see the module docstring for the keys). ``tokens``: real
    (non-padding) tokens seen. ``per_domain``: the same statistics for each domain of the
    data (None when not split). ``transitions``: key -> (H-1, C, C) int64 step-to-step
    pick pairs (None when no pool is decided at several steps). ``skip``: whether the
    last entry of each count is SKIP. ``label_prefix`` / ``choice_name``: how the choices
    are shown ("E" / "expert", "M" / "module").
    """

    arch: str
    counts: dict[str, torch.Tensor]
    tokens: int
    per_domain: dict[str, UsageStats] | None = None
    transitions: dict[str, torch.Tensor] | None = None
    skip: bool = False
    label_prefix: str = ""
    choice_name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise UsageError(f"arch must name the model family, got {self.arch!r}")
        self.counts = _canonical_keys(self.counts)
        self.transitions = _canonical_keys(self.transitions)
        legacy = _LEGACY_LABELS.get(self.arch, ("C", "choice"))
        self.label_prefix = self.label_prefix or legacy[0]
        self.choice_name = self.choice_name or legacy[1]

    def column_labels(self, num_columns: int) -> list[str]:
        """Names of the columns of a count: E0.. / M0.., SKIP last when it is a choice."""
        return choice_labels(self.label_prefix, num_columns, self.skip)

    def frequencies(self, norm: str = "max") -> dict[str, torch.Tensor]:
        """Per key, counts normalised within the key by their max (default) or sum."""
        _check_norm(norm)
        return {key: normalize(c, norm) for key, c in self.counts.items()}

    def module_counts(self) -> dict[str, torch.Tensor]:
        """Counts per pool (`RoutedPool.name`), without SKIP.

        A pool decided at several steps (MoM: ``chunk{c}/step{h}/attn``) is summed over its
        steps into ``chunk{c}/attn`` (a module of a chunk is the same parameters at every
        step, so this is what deciding whether to prune it needs); a pool decided once
        (ModuleFormer: ``layer{l}/attn``) keeps its counts.
        """
        pooled: dict[str, torch.Tensor] = {}
        for key, c in self.counts.items():
            name = "/".join(part for part in key.split("/") if not part.startswith("step"))
            modules = c[:-1] if self.skip else c
            pooled[name] = pooled[name] + modules if name in pooled else modules.clone()
        return pooled

    def module_frequencies(self, norm: str = "max") -> dict[str, torch.Tensor]:
        """`module_counts` normalised within each pool by the max (default) or the sum."""
        _check_norm(norm)
        return {key: normalize(c, norm) for key, c in self.module_counts().items()}

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (`from_json` reads it back). ``frequencies`` (max-
        normalised) is included for readers and ignored by `from_json`."""
        out: dict[str, Any] = {
            "arch": self.arch,
            "tokens": self.tokens,
            "skip": self.skip,
            "label_prefix": self.label_prefix,
            "choice_name": self.choice_name,
            "counts": {key: c.tolist() for key, c in self.counts.items()},
            "frequencies": {key: f.tolist() for key, f in self.frequencies().items()},
        }
        if self.transitions is not None:
            out["transitions"] = {key: t.tolist() for key, t in self.transitions.items()}
        if self.per_domain is not None:
            out["per_domain"] = {name: s.to_json() for name, s in self.per_domain.items()}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UsageStats:
        try:
            per_domain = d.get("per_domain")
            transitions = d.get("transitions")
            return cls(
                arch=d["arch"],
                counts={k: torch.tensor(v, dtype=torch.int64) for k, v in d["counts"].items()},
                tokens=int(d["tokens"]),
                per_domain=(
                    None
                    if per_domain is None
                    else {name: cls.from_json(s) for name, s in per_domain.items()}
                ),
                transitions=(
                    None
                    if transitions is None
                    else {k: torch.tensor(v, dtype=torch.int64) for k, v in transitions.items()}
                ),
                skip=bool(d.get("skip", False)),
                label_prefix=str(d.get("label_prefix", "")),
                choice_name=str(d.get("choice_name", "")),
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise UsageError(
                f"not a usage-statistics JSON object ({type(error).__name__}: {error}); "
                "write one with `modformer usage MODEL DATA --out usage.json`"
            ) from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> UsageStats:
        """Read a file written by `save` / `modformer usage --out`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(
                f"usage file {str(path)!r} does not exist; write it with `modformer usage`"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"usage file {str(path)!r} is unreadable ({error})") from None
        return cls.from_json(data)

    def save(self, path: str | os.PathLike) -> None:
        from modformer.utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=1))


def merge_usage(parts: Iterable[UsageStats]) -> UsageStats:
    """The sum of statistics of the same model on different data (e.g. the domains)."""
    parts = list(parts)
    if not parts:
        raise UsageError("nothing to merge: no usage statistics given")
    first = parts[0]
    for part in parts[1:]:
        if part.arch != first.arch or part.counts.keys() != first.counts.keys():
            raise UsageError("cannot merge usage statistics of different models")
    counts = {key: sum(p.counts[key] for p in parts) for key in first.counts}
    transitions = None
    if first.transitions is not None:
        transitions = {key: sum(p.transitions[key] for p in parts) for key in first.transitions}
    return UsageStats(
        arch=first.arch,
        counts=counts,
        tokens=sum(p.tokens for p in parts),
        transitions=transitions,
        skip=first.skip,
        label_prefix=first.label_prefix,
        choice_name=first.choice_name,
    )


# ---- collection ------------------------------------------------------------------------


def routed_model(model: nn.Module) -> RoutedModel:
    """`model` itself when it is a routed model; a clear error for models without routing."""
    if isinstance(model, RoutedModel):
        return model
    raise UsageError(
        f"{type(model).__name__} has no routers, so there is no module usage to count; "
        "usage statistics need a routed causal LM (ModuleFormer or MoM)"
    )


class _Counter:
    """Device-side accumulators for one `collect_usage` call."""

    def __init__(self, device: torch.device):
        self.device = device
        self.counts: dict[str, torch.Tensor] = {}
        self.transitions: dict[str, torch.Tensor] = {}
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)

    def add_picks(self, key: str, decision: RoutingDecision, weight: torch.Tensor) -> None:
        """weight: (n,) int64, 1 for real tokens."""
        counts = decision.counts(weight)
        self.counts[key] = self.counts[key] + counts if key in self.counts else counts

    def add_transition(
        self,
        key: str,
        pair_index: int,
        before: torch.Tensor,
        after: torch.Tensor,
        num_columns: int,
        weight: torch.Tensor,
    ) -> None:
        """Every (pick at step h, pick at step h+1) pair of each real token: the pair
        (i, j) is flattened to i * C + j and counted with one scatter_add_."""
        pairs = before[:, :, None] * num_columns + after[:, None, :]  # (n, k, k)
        per_pair = weight[:, None, None].expand_as(pairs)
        table = self.transitions[key][pair_index].view(-1)  # a view: counts in place
        table.scatter_add_(0, pairs.reshape(-1), per_pair.reshape(-1))

    def new_transitions(self, key: str, steps: int, num_columns: int) -> None:
        if key not in self.transitions:
            self.transitions[key] = torch.zeros(
                steps - 1, num_columns, num_columns, dtype=torch.int64, device=self.device
            )

    def count(self, model: RoutedModel, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Count the decisions of one forward pass over the (B, T) batch x."""
        if mask is None:
            weight = torch.ones(x.numel(), dtype=torch.int64, device=x.device)
        else:
            weight = mask.reshape(-1).to(device=x.device, dtype=torch.int64)
        self.tokens += weight.sum()
        previous: dict[str, torch.Tensor] = {}  # per multi-step pool: the last step's picks
        for routed in model.routing_decisions(x, mask):  # in execution order
            pool, decision = routed.pool, routed.decision
            self.add_picks(routed.key, decision, weight)
            if not pool.per_step:
                continue
            columns = decision.num_columns
            self.new_transitions(pool.name, pool.steps, columns)
            if routed.step > 0:
                before = previous[pool.name]
                self.add_transition(
                    pool.name, routed.step - 1, before, decision.indices, columns, weight
                )
            previous[pool.name] = decision.indices

    def result(self, model: RoutedModel) -> UsageStats:
        pools = model.routed_pools()
        return UsageStats(
            arch=model.routing_family,
            counts={key: c.cpu() for key, c in self.counts.items()},
            tokens=int(self.tokens),  # the one host sync of the whole collection
            transitions=(
                {key: t.cpu() for key, t in self.transitions.items()}
                if any(pool.per_step for pool in pools)
                else None
            ),
            skip=any(pool.has_skip for pool in pools),
            label_prefix=pools[0].label_prefix if pools else "",
            choice_name=pools[0].choice_name if pools else "",
        )


@torch.no_grad()
def collect_usage(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    attention_mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> UsageStats:
    """Count the routing decisions of `model` over `batches` of (B, T) token ids.

    ``attention_mask_fn(batch)`` may return a (B, T) mask (1 = real token): padding is
    neither counted nor in ``tokens``. The model runs in eval mode without gradients (its
    mode is restored afterwards).
    """
    routed = routed_model(model)
    device = torch.device(device)
    counter = _Counter(device)
    was_training = model.training
    model.eval()
    seen_batch = False
    try:
        for batch in batches:
            if not isinstance(batch, torch.Tensor) or batch.dim() != 2:
                raise UsageError(
                    "collect_usage needs batches of (B, T) token-id tensors, got "
                    + (
                        f"shape {tuple(batch.shape)}"
                        if isinstance(batch, torch.Tensor)
                        else type(batch).__name__
                    )
                )
            seen_batch = True
            x = batch.to(device)
            mask = None
            if attention_mask_fn is not None:
                mask = attention_mask_fn(batch).to(device)
                if mask.shape != x.shape:
                    raise UsageError(
                        f"attention_mask_fn returned shape {tuple(mask.shape)} for a batch of "
                        f"shape {tuple(x.shape)}; it must return one flag per token"
                    )
            counter.count(routed, x, mask)
    finally:
        model.train(was_training)
    if not seen_batch:
        raise UsageError("no batches to count: the data holds fewer tokens than one window")
    return counter.result(routed)


# ---- data sets and tokenizers ----------------------------------------------------------


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_same_tokenizer(model_dir: str | os.PathLike, data_dir: str | os.PathLike) -> None:
    """Raise when the model directory and the prepared data both carry a tokenizer.json
    and the two differ (same bytes, or the same JSON content, count as equal). Nothing
    to compare when either has none."""
    from modformer.data.corpus import DataError
    from modformer.data.prepare import TOKENIZER_DIR

    model_file = Path(model_dir) / "tokenizer.json"
    if not model_file.is_file() and (Path(model_dir) / "model" / "tokenizer.json").is_file():
        model_file = Path(model_dir) / "model" / "tokenizer.json"  # a training out_dir
    data_file = Path(data_dir) / TOKENIZER_DIR / "tokenizer.json"
    if not (model_file.is_file() and data_file.is_file()):
        return
    if _file_digest(model_file) == _file_digest(data_file):
        return
    try:
        same = json.loads(model_file.read_text(encoding="utf-8")) == json.loads(
            data_file.read_text(encoding="utf-8")
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        same = False
    if not same:
        raise DataError(
            f"the data set was prepared with a different tokenizer than the model's: "
            f"{str(data_file)!r} differs from {str(model_file)!r}; prepare the data with the "
            f"model's tokenizer (`modformer prepare --tokenizer {model_file.parent}`) or use "
            "data prepared for this model"
        )


def _take(batches: Iterable[torch.Tensor], max_batches: int | None) -> Iterator[torch.Tensor]:
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def collect_usage_on_data(
    model: nn.Module | str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "val",
    block_size: int = 128,
    batch_size: int = 8,
    max_batches: int | None = None,
    per_domain: bool = True,
    device: torch.device | str = "cpu",
) -> UsageStats:
    """Usage over every non-overlapping window of a prepared split.

    `model` is a model or a model directory (then loaded onto `device`). The data's
    vocabulary must fit the model, and when the model's directory is known (a path, or
    the ``name_or_path`` of a model loaded with `from_pretrained`) its tokenizer must be
    the data's. With ``per_domain`` each domain is counted on its own windows (at most
    ``max_batches`` batches each) and the overall statistics are their sum, so a window
    never crosses a domain boundary; without it the split is one stream.
    """
    from modformer.data.dataset import TokenDataset

    if block_size < 1:
        raise UsageError(f"block_size must be >= 1, got {block_size}")
    if max_batches is not None and max_batches < 1:
        raise UsageError(f"max_batches must be >= 1 or None, got {max_batches}")
    if isinstance(model, (str, os.PathLike)):
        from modformer.models.loading import load_model, resolve_model_dir

        model_dir: Path | None = resolve_model_dir(model)
        model = load_model(model_dir, str(device))
    else:
        name = getattr(model, "name_or_path", "") or ""
        model_dir = Path(name) if name and Path(name).is_dir() else None
    routed_model(model)  # fail on GPT before touching the data
    ds = TokenDataset(data_dir, split)
    ds.check_vocab_fits(model.config.vocab_size)
    if model_dir is not None:
        check_same_tokenizer(model_dir, data_dir)
    if not per_domain:
        return collect_usage(
            model, _take(ds.iter_sequential(block_size, batch_size), max_batches), device=device
        )
    parts = {
        name: collect_usage(
            model,
            _take(ds.iter_sequential(block_size, batch_size, domain=name), max_batches),
            device=device,
        )
        for name in ds.domains
    }
    overall = merge_usage(parts.values())
    overall.per_domain = parts
    return overall


# ---- table -----------------------------------------------------------------------------


def _table_rows(stats: UsageStats, norm: str) -> list[tuple[str, list[str], list[list[float]]]]:
    """(title, row labels, rows of frequencies) per table: one for attention, one for FFN."""
    freqs = stats.frequencies(norm)
    tables = []
    for kind in POOL_KINDS:
        keys = [key for key in stats.counts if key.endswith(f"/{kind}")]
        labels = [key.rsplit("/", 1)[0] for key in keys]
        tables.append((kind, labels, [freqs[key].tolist() for key in keys]))
    return tables


def format_usage_table(stats: UsageStats, norm: str = "max") -> str:
    """Frequencies as text: a row per decision (a ModuleFormer layer, a MoM chunk step), a
    column per choice (expert / module), SKIP last when it is a choice."""
    _check_norm(norm)
    lines = [f"{stats.arch} usage over {stats.tokens:,} tokens (normalised by {norm})"]
    for kind, labels, rows in _table_rows(stats, norm):
        if not rows:
            continue
        width = max(len(r) for r in rows)
        header = stats.column_labels(width)
        label_width = max(12, *(len(label) for label in labels))
        lines.append("")
        lines.append(f"{kind:<{label_width}} " + " ".join(f"{h:>6}" for h in header))
        for label, row in zip(labels, rows):
            lines.append(f"{label:<{label_width}} " + " ".join(f"{v:>6.3f}" for v in row))
    return "\n".join(lines)
