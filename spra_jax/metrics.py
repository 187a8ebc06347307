"""Classification metrics the paper reports: accuracy, Matthews correlation, F1.

Pure numpy on integer labels, so they run on host-side predictions from any
model. Multi-class MCC is the generalised (Gorodkin) form; F1 is binary for two
classes and macro-averaged otherwise, as GLUE-style reports do.

  >>> from spra_jax import metrics
  >>> metrics.classification([1, 0, 1, 1], [1, 0, 0, 1])
  {'accuracy': 0.75, 'mcc': 0.5773502691896258, 'f1': 0.8}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["accuracy", "classification", "confusion", "f1", "mcc"]


def confusion(labels: Sequence[int], predictions: Sequence[int], num_classes: int | None = None) -> np.ndarray:
  """The confusion matrix ``C[true, predicted]`` (int64).

  >>> confusion([0, 1, 1], [0, 1, 0]).tolist()
  [[1, 0], [1, 1]]
  """
  y, p = np.asarray(labels, np.int64).ravel(), np.asarray(predictions, np.int64).ravel()
  if y.shape != p.shape:
    raise ValueError(f"labels and predictions must have the same length, got {y.shape[0]} and {p.shape[0]}")
  if y.size and (y.min() < 0 or p.min() < 0):
    raise ValueError("labels and predictions must be non-negative class ids")
  n = num_classes if num_classes is not None else int(max(y.max(initial=-1), p.max(initial=-1)) + 1)
  out = np.zeros((max(n, 1), max(n, 1)), np.int64)
  np.add.at(out, (y, p), 1)
  return out


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
  """The fraction of correct predictions.

  >>> accuracy([0, 1, 1, 0], [0, 1, 0, 0])
  0.75
  """
  c = confusion(labels, predictions)
  return float(np.trace(c) / max(c.sum(), 1))


def mcc(labels: Sequence[int], predictions: Sequence[int]) -> float:
  """Matthews correlation coefficient (multi-class form); 0 when undefined.

  >>> mcc([0, 1, 0, 1], [0, 1, 0, 1]), mcc([0, 1, 0, 1], [1, 1, 1, 1])
  (1.0, 0.0)
  """
  c = confusion(labels, predictions).astype(np.float64)
  s, correct = c.sum(), np.trace(c)
  t, p = c.sum(axis=1), c.sum(axis=0)  # true and predicted counts per class
  numerator = correct * s - t @ p
  denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
  return float(numerator / denominator) if denominator > 0 else 0.0


def f1(labels: Sequence[int], predictions: Sequence[int], *, average: str | None = None) -> float:
  """F1: of class 1 for binary labels, else macro-averaged over classes.

  Args:
    labels: true class ids.
    predictions: predicted class ids.
    average: ``"binary"`` or ``"macro"``; by default binary for two classes.

  >>> f1([0, 1, 1, 1], [0, 1, 0, 1])
  0.8
  """
  c = confusion(labels, predictions).astype(np.float64)
  if average is None:
    average = "binary" if c.shape[0] <= 2 else "macro"
  if average not in ("binary", "macro"):
    raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")
  tp = np.diag(c)
  denominator = c.sum(axis=0) + c.sum(axis=1)  # 2·tp + fp + fn
  per_class = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
  if average == "binary":
    return float(per_class[1]) if c.shape[0] > 1 else 0.0
  return float(per_class.mean())


def classification(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """Accuracy, MCC and F1 in one dict (the paper's classification metrics)."""
  return {"accuracy": accuracy(labels, predictions), "mcc": mcc(labels, predictions), "f1": f1(labels, predictions)}
