"""Writing a native transformers model directory (the `export hf` targets)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedConfig

from modformer.utils import TOKENIZER_FILES


def write_hf_directory(
    config: PreTrainedConfig,
    weights: dict[str, torch.Tensor],
    dst: str | Path,
    tokenizer_dir: Path | None,
) -> Path:
    """config.json + model.safetensors (+ tokenizer files) written atomically to `dst`."""
    from modformer.models.io import _replace_dir

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        config.save_pretrained(tmp)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copy2(tokenizer_dir / name, tmp / name)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
