"""Errors the `modformer` command reports as one clear line (exit status 2), not a traceback.

Configuration and input errors are `ValueError`s (`ConfigError`, `DataError`, ...); the
classes here are for failures that are not a bad value: a broken checkpoint, a diverged
run, a busy output directory.
"""

from __future__ import annotations


class ModformerError(RuntimeError):
    """A failure whose message names the problem and the fix."""
