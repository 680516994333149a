"""Analysis of trained modular models: module usage statistics (`usage`) and routing
reports with plots (`routing_report`). Names are imported on first use (see
modformer._lazy)."""

from typing import TYPE_CHECKING

from modformer._lazy import lazy_exports

_EXPORTS = {
    name: "modformer.analysis.usage"
    for name in (
        "UsageError",
        "UsageStats",
        "check_same_tokenizer",
        "collect_usage",
        "collect_usage_on_data",
    )
}
__all__ = [
    "UsageError",
    "UsageStats",
    "check_same_tokenizer",
    "collect_usage",
    "collect_usage_on_data",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from modformer.analysis.usage import (
        UsageError,
        UsageStats,
        check_same_tokenizer,
        collect_usage,
        collect_usage_on_data,
    )
