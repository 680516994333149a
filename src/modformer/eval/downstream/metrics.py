"""Scores of the fine-tuning tasks, from scikit-learn and scipy: accuracy, F1, MCC for
classification (GLUE's conventions), Pearson / Spearman / MSE for regression (STS-B)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as sk


def _labels(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true has {y_true.size} labels but y_pred has {y_pred.size}; they must match"
        )
    if y_true.size == 0:
        raise ValueError("no labels to score")
    return y_true, y_pred


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    return float(sk.accuracy_score(*_labels(y_true, y_pred)))


def f1_binary(y_true: Sequence[int], y_pred: Sequence[int], positive: int = 1) -> float:
    """F1 of the ``positive`` class (GLUE's F1 for MRPC and QQP: positive = 1); 0 when no
    example is positive on either side."""
    y_true, y_pred = _labels(y_true, y_pred)
    return float(sk.f1_score(y_true == positive, y_pred == positive, zero_division=0))


def f1_macro(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in ``y_true`` or
    ``y_pred`` (classes in neither do not drag it down)."""
    y_true, y_pred = _labels(y_true, y_pred)
    _check_classes(y_true, y_pred, num_classes)
    return float(sk.f1_score(y_true, y_pred, average="macro", zero_division=0))


def matthews_corrcoef(
    y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None
) -> float:
    """Matthews correlation (Gorodkin's multi-class R_K); 0 when undefined."""
    y_true, y_pred = _labels(y_true, y_pred)
    _check_classes(y_true, y_pred, num_classes)
    return float(sk.matthews_corrcoef(y_true, y_pred))


def _check_classes(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None) -> None:
    if num_classes is not None and (
        min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= num_classes
    ):
        raise ValueError(f"class indices must lie in [0, {num_classes})")


def _values(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"the two sequences have {x.size} and {y.size} values; they must match")
    if x.size < 2:
        raise ValueError("a correlation needs at least 2 values")
    return x, y


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant (it is undefined there)."""
    with warnings.catch_warnings():  # scipy warns on constant input and returns NaN
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.pearsonr(*_values(x, y)).statistic)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (tied values share their mean rank)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(*_values(x, y)).statistic)


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], num_classes: int
) -> dict[str, float]:
    """accuracy, macro F1 and MCC; for 2 classes also the F1 of class 1 (``f1``)."""
    metrics = {
        "accuracy": accuracy(y_true, y_pred),
        "f1_macro": f1_macro(y_true, y_pred, num_classes),
        "mcc": matthews_corrcoef(y_true, y_pred, num_classes),
    }
    if num_classes == 2:
        metrics["f1"] = f1_binary(y_true, y_pred, positive=1)
    return metrics


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    y_true, y_pred = _values(y_true, y_pred)
    return {
        "pearson": pearson(y_true, y_pred),
        "spearman": spearman(y_true, y_pred),
        "mse": float(np.mean((y_true - y_pred) ** 2)),
    }
