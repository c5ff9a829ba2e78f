"""Evaluation metrics of the fine-tuning tasks (numpy only, so no scikit-learn is needed)."""

from __future__ import annotations

import numpy as np


def rmse(prediction: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared error."""
    return float(np.sqrt(np.mean((np.asarray(prediction, np.float64) - target) ** 2)))


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random
    negative, ties counting one half (the Mann-Whitney U statistic with average ranks)."""
    score = np.asarray(score, dtype=np.float64)
    positive = np.asarray(label) > 0.5
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError("roc_auc needs both positive and negative labels")
    ordered = np.sort(score)
    # 1-based average rank of each score among all scores (ties share the mean of their ranks).
    rank = (np.searchsorted(ordered, score, "left") + np.searchsorted(ordered, score, "right") + 1) / 2
    return float((rank[positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def task_metrics(problem: str, prediction: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """RMSE (and MAE) for regression; ROC-AUC and accuracy at logit 0 for binary tasks."""
    if problem == "regression":
        return {"rmse": rmse(prediction, target),
                "mae": float(np.mean(np.abs(np.asarray(prediction, np.float64) - target)))}
    return {"roc_auc": roc_auc(prediction, target),
            "accuracy": float(np.mean((prediction > 0) == (target > 0.5)))}
