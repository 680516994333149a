"""Module usage statistics: how often each module/expert is picked, per layer or chunk step.

This is the activation frequency ``f_m`` of ModuleFormer sec. 5.3 (how often expert m is
in a token's top-k, counted over the real tokens of a data set, then normalised within
each layer by the max (default) or the sum) and the module loads / routing paths of MoM
(paper Figure 6). Pruning (`modformer.surgery`) and the routing reports
(`routing_report.py`) both start from a `UsageStats`.

Keys of ``UsageStats.counts`` (each a (num_choices,) int64 tensor):

- ModuleFormer: ``layer{l}/att`` (attention experts) and ``layer{l}/ffd`` (FFN experts).
- MoM: ``chunk{c}/step{h}/attn`` and ``chunk{c}/step{h}/ffn``; ``num_choices`` is the
  pool size, plus one when the chunk can SKIP (the learned policy with SKIP, or the
  layer-skip / early-exit policies), and then SKIP is the last entry. Fixed ``1`` blocks
  are not listed: every token runs their one attention and one FFN.

MoM ``transitions``: ``chunk{c}/attn`` / ``chunk{c}/ffn`` -> (H-1, C, C) int64, entry
``[h, i, j]`` = how many times a token picked choice i at step h and choice j at step h+1,
counted over all K x K pairs of its picks (so one token adds K^2 per step pair).

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

ARCH_MODULEFORMER = "moduleformer"
ARCH_MOM = "mom"


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


@dataclass
class UsageStats:
    """Selection counts of every routed decision of a model on some data.

    ``arch``: "moduleformer" or "mom". ``counts``: key -> (num_choices,) int64 (see the
    module docstring for the keys). ``tokens``: real (non-padding) tokens seen.
    ``per_domain``: the same statistics for each domain of the data (None when not split).
    ``transitions``: MoM only, key -> (H-1, C, C) int64 step-to-step pick pairs.
    ``skip``: MoM only, whether the last entry of each count is SKIP.
    """

    arch: str
    counts: dict[str, torch.Tensor]
    tokens: int
    per_domain: dict[str, UsageStats] | None = None
    transitions: dict[str, torch.Tensor] | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        if self.arch not in (ARCH_MODULEFORMER, ARCH_MOM):
            raise UsageError(
                f"arch must be {ARCH_MODULEFORMER!r} or {ARCH_MOM!r}, got {self.arch!r}"
            )

    def frequencies(self, norm: str = "max") -> dict[str, torch.Tensor]:
        """Per key, counts normalised within the key by their max (default) or sum."""
        _check_norm(norm)
        return {key: normalize(c, norm) for key, c in self.counts.items()}

    def module_counts(self) -> dict[str, torch.Tensor]:
        """Counts per module pool, without SKIP.

        MoM: ``chunk{c}/attn`` / ``chunk{c}/ffn``, summed over the chunk's steps (a module
        of a chunk is the same parameters at every step, so this is what deciding whether
        to prune it needs). ModuleFormer: the per-layer counts as they are.
        """
        if self.arch == ARCH_MODULEFORMER:
            return dict(self.counts)
        pooled: dict[str, torch.Tensor] = {}
        for key, c in self.counts.items():
            chunk, _, kind = key.split("/")
            modules = c[:-1] if self.skip else c
            name = f"{chunk}/{kind}"
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
    )


# ---- collection ------------------------------------------------------------------------


def model_arch(model: nn.Module) -> str:
    """ "moduleformer" or "mom"; a clear error for models without routing."""
    from modformer.models.moduleformer import ModuleFormerModel
    from modformer.models.mom import MoMModel

    base = getattr(model, "base_model", model)
    if isinstance(base, ModuleFormerModel):
        return ARCH_MODULEFORMER
    if isinstance(base, MoMModel):
        return ARCH_MOM
    raise UsageError(
        f"{type(model).__name__} has no routers, so there is no module usage to count; "
        "usage statistics need a ModuleFormer or MoM model (arch 'moduleformer' or 'mom')"
    )


def mom_has_skip(config: Any) -> bool:
    """Whether a MoM chunk's choices include SKIP (the pool size as the last index)."""
    if config.policy == "learned":
        return bool(config.skip)
    return config.policy in ("layer_skip", "early_exit")


class _Counter:
    """Device-side accumulators for one `collect_usage` call."""

    def __init__(self, arch: str, device: torch.device):
        self.arch = arch
        self.device = device
        self.counts: dict[str, torch.Tensor] = {}
        self.transitions: dict[str, torch.Tensor] = {}
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)

    def add_picks(self, key: str, picks: torch.Tensor, num_choices: int, weight: torch.Tensor):
        """picks: (n, k) choice indices; weight: (n,) int64, 1 for real tokens."""
        if key not in self.counts:
            self.counts[key] = torch.zeros(num_choices, dtype=torch.int64, device=self.device)
        k = picks.shape[-1]
        self.counts[key].scatter_add_(
            0, picks.reshape(-1), weight[:, None].expand(-1, k).reshape(-1)
        )

    def add_transition(
        self,
        key: str,
        pair_index: int,
        before: torch.Tensor,
        after: torch.Tensor,
        num_choices: int,
        weight: torch.Tensor,
    ) -> None:
        """Every (pick at step h, pick at step h+1) pair of each real token: the pair
        (i, j) is flattened to i * C + j and counted with one scatter_add_."""
        pairs = before[:, :, None] * num_choices + after[:, None, :]  # (n, k, k)
        per_pair = weight[:, None, None].expand_as(pairs)
        table = self.transitions[key][pair_index].view(-1)  # a view: counts in place
        table.scatter_add_(0, pairs.reshape(-1), per_pair.reshape(-1))

    def new_transitions(self, key: str, steps: int, num_choices: int) -> None:
        if key not in self.transitions:
            self.transitions[key] = torch.zeros(
                steps - 1, num_choices, num_choices, dtype=torch.int64, device=self.device
            )

    def result(self, skip: bool) -> UsageStats:
        return UsageStats(
            arch=self.arch,
            counts={key: c.cpu() for key, c in self.counts.items()},
            tokens=int(self.tokens),  # the one host sync of the whole collection
            transitions=(
                {key: t.cpu() for key, t in self.transitions.items()}
                if self.arch == ARCH_MOM
                else None
            ),
            skip=skip,
        )


def _count_moduleformer(base: nn.Module, x: torch.Tensor, mask, counter: _Counter) -> None:
    out = base(input_ids=x, attention_mask=mask, use_cache=False)
    n = x.numel()
    weight = (
        torch.ones(n, dtype=torch.int64, device=x.device)
        if out.token_mask is None
        else out.token_mask.to(torch.int64)
    )
    counter.tokens += weight.sum()
    config = base.config
    for layer, (att, ffd) in enumerate(out.router_outputs):
        # Each layer's own count: a pruned model's layers may differ.
        n_att, n_ffd = config.att_experts_in_layer(layer), config.ffd_experts_in_layer(layer)
        counter.add_picks(f"layer{layer}/att", att.top_k_indices, n_att, weight)
        counter.add_picks(f"layer{layer}/ffd", ffd.top_k_indices, n_ffd, weight)


def _count_mom(base: nn.Module, x: torch.Tensor, mask, counter: _Counter, skip: bool) -> None:
    out = base(input_ids=x, attention_mask=mask, use_cache=False, return_routing=True)
    n = x.numel()
    if mask is None:
        weight = torch.ones(n, dtype=torch.int64, device=x.device)
    else:
        weight = mask.reshape(-1).to(device=x.device, dtype=torch.int64)
    counter.tokens += weight.sum()
    extra = 1 if skip else 0  # SKIP is the index after the pool's modules
    steps = base.config.H
    previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for route in out.routing:  # chunk steps in execution order
        c, h = route.chunk, route.step
        attn = route.attn_index.reshape(n, -1)
        ffn = route.ffn_index.reshape(n, -1)
        n_attn, n_ffn = route.num_attn_modules + extra, route.num_ffn_modules + extra
        counter.add_picks(f"chunk{c}/step{h}/attn", attn, n_attn, weight)
        counter.add_picks(f"chunk{c}/step{h}/ffn", ffn, n_ffn, weight)
        counter.new_transitions(f"chunk{c}/attn", steps, n_attn)
        counter.new_transitions(f"chunk{c}/ffn", steps, n_ffn)
        if h > 0:
            prev_attn, prev_ffn = previous[c]
            counter.add_transition(f"chunk{c}/attn", h - 1, prev_attn, attn, n_attn, weight)
            counter.add_transition(f"chunk{c}/ffn", h - 1, prev_ffn, ffn, n_ffn, weight)
        previous[c] = (attn, ffn)


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
    arch = model_arch(model)
    base = getattr(model, "base_model", model)
    device = torch.device(device)
    skip = arch == ARCH_MOM and mom_has_skip(base.config)
    counter = _Counter(arch, device)
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
            if arch == ARCH_MODULEFORMER:
                _count_moduleformer(base, x, mask, counter)
            else:
                _count_mom(base, x, mask, counter, skip)
    finally:
        model.train(was_training)
    if not seen_batch:
        raise UsageError("no batches to count: the data holds fewer tokens than one window")
    return counter.result(skip)


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
    model_arch(model)  # fail on GPT before touching the data
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
    kinds = ("att", "ffd") if stats.arch == ARCH_MODULEFORMER else ("attn", "ffn")
    for kind in kinds:
        keys = [key for key in stats.counts if key.endswith(f"/{kind}")]
        labels = [key.rsplit("/", 1)[0] for key in keys]
        tables.append((kind, labels, [freqs[key].tolist() for key in keys]))
    return tables


def format_usage_table(stats: UsageStats, norm: str = "max") -> str:
    """Frequencies as text: a row per layer (ModuleFormer) or chunk step (MoM), a column
    per expert/module, SKIP last for MoM with SKIP."""
    _check_norm(norm)
    lines = [f"{stats.arch} usage over {stats.tokens:,} tokens (normalised by {norm})"]
    for kind, labels, rows in _table_rows(stats, norm):
        if not rows:
            continue
        width = max(len(r) for r in rows)
        header = [f"E{i}" if stats.arch == ARCH_MODULEFORMER else f"M{i}" for i in range(width)]
        if stats.skip:
            header[-1] = "SKIP"
        label_width = max(12, *(len(label) for label in labels))
        lines.append("")
        lines.append(f"{kind:<{label_width}} " + " ".join(f"{h:>6}" for h in header))
        for label, row in zip(labels, rows):
            lines.append(f"{label:<{label_width}} " + " ".join(f"{v:>6.3f}" for v in row))
    return "\n".join(lines)
