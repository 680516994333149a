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
FAULTS_SCRIPT = """
import resource, torch
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
