"""Activation memory with a KV cache, as the MoM paper's Table 1 measures it:
`modformer cost --memory cache`.

The paper's memory column is logits plus a per-layer cache term (docs/results.md,
"Memory as Table 1 measures it"): weights are not in it (its MoE row has 2.3x GPT-2's
parameters and the same memory). Each model family states the formula in its
``flops.py`` (`CacheMemory`: logits, keys + values per cache layer, MoM's key flags and
GRU router state), reached through ``model.cache_memory(batch_size, seq_len)``;
`measured_cache_memory` takes the same figures from the tensors of one real forward with
``use_cache=True``, which is how the formula is tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from modformer.models.flops import CacheMemory
from modformer.models.outputs import output_cache
from modformer.nn.routers import GRURouter


@torch.no_grad()
def measured_cache_memory(
    model: PreTrainedModel, batch_size: int, seq_len: int, seed: int = 0
) -> CacheMemory:
    """The figures of `CacheMemory` read off one inference forward with a KV cache on
    random token ids: the bytes of the logits, of every cache layer's keys and values
    (bool layers are MoM's key flags), and of the largest pair of GRU router states one
    chunk holds at once (attention and FFN router, caught by forward hooks)."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator)
    state_bytes: dict[int, int] = {}  # router id -> the largest state it returned

    def hook(router, args, output) -> None:
        state_bytes[id(router)] = max(state_bytes.get(id(router), 0), output[1].nbytes)

    routers = [m for m in model.modules() if isinstance(m, GRURouter)]
    handles = [m.register_forward_hook(hook) for m in routers]
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids.to(device), use_cache=True)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    cache = output_cache(out)
    kv, flags, layers = 0, 0, 0
    for layer in cache.layers:
        size = layer.keys.nbytes + layer.values.nbytes
        if layer.keys.dtype == torch.bool:
            flags += size
        else:
            kv, layers = kv + size, layers + 1
    router_state = 0
    for chunk in getattr(model.transformer, "chunks", []):
        policy = chunk.policy
        pair = [getattr(policy, name, None) for name in ("attn_router", "ffn_router")]
        router_state = max(router_state, sum(state_bytes.get(id(r), 0) for r in pair))
    return CacheMemory(
        batch_size=batch_size,
        seq_len=seq_len,
        logits=out.logits.nbytes,
        kv_cache=kv,
        cache_layers=layers,
        key_flags=flags,
        router_state=router_state,
    )


@dataclass
class CacheMemoryRow:
    """One model's formula figures (`formula`) beside the measured ones (`measured`, None
    when not measured), and the formula total's change against the first row."""

    name: str
    formula: CacheMemory
    measured: CacheMemory | None
    total_vs_first: float = 0.0

    def as_dict(self) -> dict:
        out = {"name": self.name, "total_vs_first": self.total_vs_first}
        for key in ("formula", "measured"):
            value = getattr(self, key)
            out[key] = None if value is None else {**asdict(value), "total": value.total}
        return out


def cache_memory_rows(
    entries: Sequence[tuple[str, PreTrainedModel | PreTrainedConfig]],
    batch_size: int,
    seq_len: int,
    measure: bool = True,
    seed: int = 0,
) -> list[CacheMemoryRow]:
    """For each (name, model or config): `model.cache_memory` and, with `measure`, the
    measured figures of one forward with a cache at batch_size x seq_len (a config gets a
    seeded random-init model: the figures do not depend on the weights)."""
    from modformer.models.registry import build_model

    if not entries:
        raise ValueError("cache_memory_rows needs at least one (name, model or config) entry")
    rows = []
    for name, model in entries:
        if isinstance(model, PreTrainedConfig):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build_model(model)
        if not callable(getattr(model, "cache_memory", None)):
            raise ValueError(f"{name}: {type(model).__name__} has no cache-memory formula")
        formula = model.cache_memory(batch_size, seq_len)
        measured = measured_cache_memory(model, batch_size, seq_len, seed) if measure else None
        rows.append(CacheMemoryRow(name, formula, measured))
    for row in rows:
        row.total_vs_first = row.formula.total / rows[0].formula.total - 1.0
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def format_cache_memory_table(rows: Sequence[CacheMemoryRow]) -> str:
    """Formula components in MiB, the total's change against the first row, and whether
    the measured tensors agree with the formula byte for byte."""
    header = ["name", "layers", "logits", "KV cache", "key flags", "router state", "total",
              "vs first", "measured"]  # fmt: skip
    lines = [header]
    for i, row in enumerate(rows):
        f, m = row.formula, row.measured
        check = "-" if m is None else ("= formula" if asdict(m) == asdict(f) else _mib(m.total))
        lines.append(
            [row.name, str(f.cache_layers), _mib(f.logits), _mib(f.kv_cache), _mib(f.key_flags),
             _mib(f.router_state), _mib(f.total), "" if i == 0 else f"{row.total_vs_first:+.1%}",
             check]
        )  # fmt: skip
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    out = []
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(line[1:], widths[1:])]
        out.append("  ".join(cells))
    return "\n".join(out)
