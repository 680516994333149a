"""lm-evaluation-harness (``lm-eval`` 0.4) on saved modformer models, offline.

lm-eval's ``hf`` backend builds the model with ``AutoModelForCausalLM.from_pretrained``,
which knows modformer's architectures only once ``modformer`` is imported (importing it
registers them with the Auto classes). Three ways to run it, all on a model directory
that holds its tokenizer files (as ``modformer train`` saves it):

1. ``modformer lm-eval MODEL --tasks T1,T2 --include-path DIR`` (`evaluate_lm_eval`): imports
   modformer, then calls ``lm_eval.simple_evaluate`` with the ``hf`` backend on MODEL,
   ``trust_remote_code=False``.
2. ``python -m modformer.eval.lmeval [lm_eval arguments]``: lm-eval's own command line,
   unchanged, in a process that has imported modformer first, e.g.
   ``python -m modformer.eval.lmeval --model hf --model_args pretrained=DIR --tasks T``.
3. The plain ``lm_eval`` command with ``trust_remote_code=True``, which needs neither
   modformer nor an import: every saved model carries its own model code and an
   ``auto_map`` in its ``config.json`` (`modformer.models.export_code`). For a directory
   saved before modformer did that, `write_remote_code` (``modformer lm-eval MODEL
   --write-remote-code``) writes them.

A local task lives in ``docs/lm_eval_task/`` (YAML + JSONL + README with the commands).
Nothing is downloaded: the model and tokenizer come from the directory (given to lm-eval
as an absolute path, so it is never mistaken for a hub id) and the local task reads its
JSONL directly; set ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` to make that a guarantee.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers imports torch; `modformer lm-eval --help` need not
    from transformers import PreTrainedConfig, PreTrainedModel

log = logging.getLogger("modformer.lmeval")

_INSTALL_HINT = "pip install 'lm-eval[hf]>=0.4.13' (or pip install 'modformer[eval]')"


def import_lm_eval() -> ModuleType:
    """``lm_eval``, with the packages its ``hf`` backend needs, or a clear error."""
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401  (TaskManager)
    except ImportError as error:
        raise ValueError(f"lm-eval is not installed ({error}); {_INSTALL_HINT}") from None
    try:
        import accelerate  # noqa: F401  (imported by lm-eval's hf backend)
    except ImportError:
        raise ValueError(
            f"lm-eval's hf backend needs the accelerate package; {_INSTALL_HINT}"
        ) from None
    return lm_eval


def _model_dir_with_tokenizer(model: str | Path) -> Path:
    from modformer.models.loading import resolve_model_dir

    model_dir = resolve_model_dir(model).resolve()
    if not (model_dir / "tokenizer.json").is_file():
        raise ValueError(
            f"{str(model_dir)!r} has no tokenizer.json beside config.json; lm-eval needs the "
            "tokenizer in the model directory (models saved by `modformer train` have it; "
            "copy the tokenizer/ files of the prepared data directory otherwise)"
        )
    return model_dir


def make_task_manager(
    include_paths: Sequence[str | Path] = (), include_default_tasks: bool = True
) -> Any:
    """An ``lm_eval.tasks.TaskManager`` over lm-eval's own tasks (unless
    ``include_default_tasks`` is False; indexing them takes a few seconds) and the task
    YAMLs under ``include_paths``."""
    lm_eval = import_lm_eval()
    paths = [Path(p).resolve() for p in include_paths]
    for path in paths:
        if not path.is_dir():
            raise ValueError(
                f"task directory {str(path)!r} does not exist; pass a directory of lm-eval task "
                "YAML files (e.g. docs/lm_eval_task)"
            )
    if not paths and not include_default_tasks:
        raise ValueError("no tasks to choose from: give an include path or keep the default tasks")
    return lm_eval.tasks.TaskManager(
        include_path=[str(p) for p in paths] or None, include_defaults=include_default_tasks
    )


def evaluate_lm_eval(
    model: str | Path,
    tasks: Sequence[str],
    include_paths: Sequence[str | Path] = (),
    include_default_tasks: bool = True,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    limit: int | float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval's ``hf`` backend on a saved modformer model; returns what
    ``lm_eval.simple_evaluate`` returns (``results``, ``versions``, ``n-shot``, ...)."""
    import modformer.models  # noqa: F401  (registers modformer's configs and models)

    if not tasks:
        raise ValueError(
            "no tasks given; pass task names, e.g. --tasks modformer_python_completion"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_dir = _model_dir_with_tokenizer(model)
    lm_eval = import_lm_eval()
    task_manager = make_task_manager(include_paths, include_default_tasks)
    unknown = [name for name in tasks if not task_manager.match_tasks([name])]
    if unknown:
        where = ", ".join(str(p) for p in include_paths) or "lm-eval's built-in tasks"
        raise ValueError(
            f"unknown lm-eval task(s) {unknown} (searched {where}); pass the directory of the "
            "task YAML with --include-path, or list the tasks with `lm-eval ls tasks`"
        )
    return lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(model_dir),
            "backend": "causal",
            "dtype": dtype,
            "trust_remote_code": False,
        },
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=task_manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def results_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of a ``simple_evaluate`` result worth keeping: per-task metrics,
    task versions, shots and the run's configuration."""
    keep = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples", "config")
    summary = {key: results[key] for key in keep if key in results}
    # config holds dtypes and other objects: round-trip through str to make it JSON.
    return json.loads(json.dumps(summary, default=str))


def write_remote_code(model: str | Path) -> Path:
    """Make MODEL loadable by any Hugging Face tool with ``trust_remote_code=True`` where
    modformer is not installed (e.g. the plain ``lm_eval`` command): (re)write the
    self-contained model code and the ``auto_map`` that ``save_pretrained`` writes (see
    `modformer.models.export_code`), for directories saved before it did. Returns the
    model directory. (Where modformer is imported, its registered classes are used.)
    """
    import modformer.models  # noqa: F401  (the Auto mappings must know modformer's types)
    from modformer.models.export_code import write_remote_code as write_model_code
    from modformer.models.loading import resolve_model_dir
    from modformer.utils import atomic_write_text

    model_dir = resolve_model_dir(model)
    config_path = model_dir / "config.json"
    config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    config_class, model_class = _modformer_classes(config_dict.get("model_type"), config_path)
    config_dict["auto_map"] = write_model_code(config_class, model_class.auto_classes(), model_dir)
    atomic_write_text(config_path, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return model_dir


def _modformer_classes(
    model_type: str | None, config_path: Path
) -> tuple[type[PreTrainedConfig], type[PreTrainedModel]]:
    from modformer.models.registry import ARCHITECTURES

    for config_class, model_class in ARCHITECTURES.values():
        if config_class.model_type == model_type:
            return config_class, model_class
    known = sorted(config_class.model_type for config_class, _ in ARCHITECTURES.values())
    raise ValueError(
        f"{str(config_path)!r} has model_type {model_type!r}, which is not a modformer "
        f"architecture ({', '.join(known)}); remote code is only needed for those"
    )


def main() -> None:
    """lm-eval's own command line in a process that has registered modformer's models."""
    import modformer.models  # noqa: F401

    try:
        import_lm_eval()
    except ValueError as error:
        sys.exit(f"python -m modformer.eval.lmeval: error: {error}")
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
