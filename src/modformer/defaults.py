"""Choices and defaults that both the library and the command line's help need.

Torch-free (the CLI builds its parser without importing torch), at the bottom of the
package's layers, so a library module and `modformer.cli_args` can both import them.
"""

from __future__ import annotations

NORMS = ("max", "sum")  # how a layer's usage counts are normalised (usage, prune, reports)
DEFAULT_KL_EPSILON = 1e-6  # smoothing of the per-domain distributions in routing reports
ATTENTION_MODES = ("causal", "dense")  # how inference FLOPs count attention scores
SPEC_SYNTAX = "[LABEL=]ARCH:PRESET[:KaHb][:key=value...]"  # `modformer cost --config`
DEFAULT_OLD_DOMAINS = ("prose", "c")  # the forgetting experiment's pretraining domains
DEFAULT_NEW_DOMAIN = "python"
DEFAULT_REG_WEIGHTS = (0.0, 0.1, 1.0)
