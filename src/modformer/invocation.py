"""The ``modformer`` command line being run, for the model cards of what it saves.

Standard library only: `modformer.cli.main` enters `cli_command` before running any
subcommand, and a light command must not import torch for it.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator, Sequence

_running: str | None = None


@contextlib.contextmanager
def cli_command(argv: Sequence[str]) -> Iterator[None]:
    """While active, `running_command` is ``modformer ARGV`` (shell-quoted)."""
    global _running
    previous, _running = _running, shlex.join(["modformer", *argv])
    try:
        yield
    finally:
        _running = previous


def running_command() -> str | None:
    """The ``modformer`` command line being run, or None outside `modformer.cli.main`."""
    return _running
