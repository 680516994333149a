"""Sharded checkpoints for FSDP runs (torch.distributed.checkpoint, "DCP").

A checkpoint `step_000100/` of a `parallel=fsdp` run holds

- `dcp/`: the model and optimizer state as DCP writes them, each rank its own shards
  (`get_state_dict` / `set_state_dict` of `torch.distributed.checkpoint.state_dict`).
  DCP reshards on load, so the checkpoint resumes on any number of processes, a single
  unsharded one included.
- `rng/rank_00000.json` ...: every rank's RNG states (Python, NumPy, torch, CUDA).
- `trainer_state.json`: step, scheduler, data position, the run's config and the
  world size and batch factors it ran with. Plain JSON: nothing here is unpickled.
- `manifest.json`: sha256 and size of every file above, checked on resume like the
  unsharded checkpoints' (`modformer.train.checkpoint.verify_checkpoint`).

It is written like the unsharded checkpoints: into `.step_000100.tmp-dcp/`, renamed by
rank 0 once every rank has finished, so a crash mid-write leaves no `step_*` directory.
All ranks must see the same `out_dir` (one filesystem; on several nodes, a shared one).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from modformer.train.checkpoint import (
    CheckpointError,
    _replace_dir,
    list_checkpoints,
    write_manifest,
)

DCP_DIR = "dcp"
RNG_DIR = "rng"
STATE_JSON = "trainer_state.json"


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (ckpt / DCP_DIR).is_dir()


def rng_state_json() -> dict[str, Any]:
    """This process's RNG states as JSON-able lists (see `set_rng_state_json`)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state_json(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


@contextlib.contextmanager
def _single_process_ok():
    """A 1-process run reads and writes the same format without a process group; DCP warns
    that it assumes so, which is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_sharded_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. `trainer_state` must be JSON-able (rank 0's is written)."""
    ckpt_root = Path(ckpt_root)
    dest = ckpt_root / f"step_{step:06d}"
    # Every rank writes into the same temporary directory, so its name is fixed, not random.
    tmp = ckpt_root / f".{dest.name}.tmp-dcp"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-write
        (tmp / RNG_DIR).mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.save(
            {"model": model_state, "optim": optim_state},
            checkpoint_id=str(tmp / DCP_DIR),
            no_dist=not dist.is_initialized(),
        )
    (tmp / RNG_DIR / f"rank_{rank:05d}.json").write_text(json.dumps(rng_state_json()))
    _barrier()
    if rank == 0:
        (tmp / STATE_JSON).write_text(json.dumps(trainer_state, indent=1))
        write_manifest(tmp)  # sha256 of every shard: verified on --resume
        _replace_dir(tmp, dest)
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_root.glob(".step_*.tmp-dcp"):  # from a run killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return dest


def load_trainer_state_json(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {ckpt}: {STATE_JSON} is missing or unreadable ({e}); delete {ckpt} "
            "to resume from an older one"
        ) from None


def load_sharded_checkpoint(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load the model and optimizer shards of this rank (resharded by DCP)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR), no_dist=not dist.is_initialized())
    except Exception as e:  # missing or truncated shard files, mismatched model
        raise CheckpointError(
            f"checkpoint {ckpt} could not be loaded ({type(e).__name__}: {e}); "
            f"delete {ckpt} to resume from an older one"
        ) from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def restore_rank_rng(ckpt: Path, rank: int, seed: int) -> bool:
    """Restore this rank's RNG states; True if the checkpoint had them. A rank the
    checkpointed run did not have (more processes now) gets fresh streams seeded from
    (seed, rank) instead, which is why runs on different process counts differ in their
    random draws (dropout, routing noise) though not in their data."""
    path = ckpt / RNG_DIR / f"rank_{rank:05d}.json"
    if path.is_file():
        set_rng_state_json(json.loads(path.read_text()))
        return True
    seed_rank_rng(seed, rank)
    return False


def seed_rank_rng(seed: int, rank: int) -> None:
    """Independent RNG streams for ranks > 0; rank 0 keeps the single-process stream."""
    derived = (seed * 1_000_003 + rank * 7919) % 2**63
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


def gather_full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded model state on rank 0's CPU (empty on the other ranks)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
