"""Analysis of trained modular models: module usage statistics (`usage`), routing
reports with plots (`routing_report`) and hyper-parameter sweeps (`sweep`)."""

from modformer.analysis.usage import (
    UsageError,
    UsageStats,
    check_same_tokenizer,
    collect_usage,
    collect_usage_on_data,
)

__all__ = [
    "UsageError",
    "UsageStats",
    "check_same_tokenizer",
    "collect_usage",
    "collect_usage_on_data",
]
