"""Small shared helpers: atomic writes and the CPU allocator setting."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from modformer.utils import RETAIN_MEMORY_ENV, atomic_write_text

# Allocates, fills and frees 64 MiB a few times; prints the fewest minor page faults of
# the later rounds. (Small allocations between rounds can land in the freed block and
# make the heap grow once more; a training step reaches its steady state the same way.)
# The script imports the models (and so transformers) first, as every training process
# does: on the near-empty heap of a bare `import torch` glibc keeps returning the block.
FAULTS_SCRIPT = """
import resource, torch
import modformer.models
from modformer.utils import retain_freed_memory
print(retain_freed_memory())
def faults_of_round_trip():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(16 * 2**20); a.fill_(1.0); del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_round_trip()
print(min(faults_of_round_trip() for _ in range(5)))
"""


def _steady_state_faults(retain: str) -> tuple[str, int]:
    env = {**os.environ, RETAIN_MEMORY_ENV: retain}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc"
)
def test_retained_memory_is_reused_without_page_faults():
    took_effect, faults = _steady_state_faults("1")
    assert took_effect == "True"
    assert faults < 500  # the freed 64 MiB (16384 pages) is reused as it is
    took_effect, faults = _steady_state_faults("0")
    assert took_effect == "False"
    assert faults > 10_000  # glibc's default: unmapped on free, faulted in again


def test_atomic_write_text_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_outputs_honour_the_umask(tmp_path, umask, tiny_data_dir):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700 whatever the umask); the
    renamed outputs must get the modes `open`/`mkdir` would give: 0644/0755 under 022."""
    from matplotlib.figure import Figure

    from modformer.data.prepare import prepare
    from modformer.eval.curves import _atomic_savefig
    from modformer.models.gpt import GPTConfig, GPTForCausalLM
    from modformer.train.checkpoint import atomic_save_model, save_checkpoint

    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    atomic_write_text(tmp_path / "results.json", "{}")
    assert _mode(tmp_path / "results.json") == file_mode

    _atomic_savefig(Figure(figsize=(1, 1)), tmp_path / "fig.png")
    assert _mode(tmp_path / "fig.png") == file_mode

    model = GPTForCausalLM(GPTConfig(vocab_size=32, n_positions=8, n_embd=8, n_head=2, n_layer=1))
    atomic_save_model(model, tmp_path / "model", tiny_data_dir / "tokenizer")
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, model, {"step": 1}, keep_last=1)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("alpha beta\n" * 50)
    (tmp_path / "text" / "b.txt").write_text("gamma delta\n" * 50)
    prepare(tmp_path / "data", inputs=[str(tmp_path / "text")], tokenizer="byte", progress=False)
    for directory in (tmp_path / "model", ckpt, ckpt / "model", tmp_path / "data"):
        assert _mode(directory) == dir_mode, directory
        for f in directory.rglob("*"):
            assert _mode(f) == (dir_mode if f.is_dir() else file_mode), f


def test_atomic_path_leaves_nothing_behind_on_error(tmp_path):
    from modformer.utils import atomic_path

    (tmp_path / "out.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert (tmp_path / "out.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
