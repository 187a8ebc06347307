"""Evaluation of a trained model on a tokenised split.

:func:`evaluate` runs ``predict(batch) -> logits`` over every row once, in
fixed-shape batches (the last one padded by repeating its final row, so one
compilation serves the whole split), and scores the real rows only:
classification gets accuracy, MCC and F1; supervised fine-tuning gets the mean
response-token loss and the response-token accuracy.

  >>> import numpy as np
  >>> arrays = {"input_ids": np.zeros((5, 2), np.int32), "labels": np.array([0, 1, 1, 0, 1])}
  >>> predict = lambda batch: np.eye(2)[batch["labels"]]          # a perfect classifier
  >>> evaluate(predict, arrays, task="classification", batch_size=2)["accuracy"]
  1.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from spra_jax import _host
from spra_jax import data as data_lib
from spra_jax import metrics as metrics_lib

__all__ = ["padded_batches", "evaluate", "majority_rate"]


def padded_batches(arrays: Mapping[str, np.ndarray], batch_size: int, limit: int = 0
                   ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """``(real_rows, batch)`` over every row once, in order; the last batch is padded to ``batch_size``.

  ``limit`` > 0 stops after that many rows.

  >>> [(real, b["x"].tolist()) for real, b in padded_batches({"x": np.arange(5)}, 2)]
  [(2, [0, 1]), (2, [2, 3]), (1, [4, 4])]
  """
  n = data_lib.num_rows(arrays)
  n = min(n, limit) if limit else n
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    real = len(rows)
    rows = np.concatenate([rows, np.full(batch_size - real, rows[-1])])
    yield real, {k: np.asarray(v)[rows] for k, v in arrays.items()}


def evaluate(predict: Callable[[Mapping[str, Any]], Any], arrays: Mapping[str, np.ndarray], *, task: str,
             batch_size: int, limit: int = 0) -> dict[str, float]:
  """The metrics of ``predict`` on ``arrays`` (the first ``limit`` rows; 0 = all).

  Args:
    predict: ``predict(batch) -> logits``; classification logits are
      ``[batch, classes]``, SFT logits ``[batch, length, vocab]``.
    arrays: a tokenised split (``spra.data.tokenize_classification`` or ``tokenize_sft``).
    task: ``'classification'`` or ``'sft'``.
    batch_size: rows per call of ``predict``.
    limit: score only the first ``limit`` rows (0 = all).

  Returns:
    Classification: ``accuracy``, ``mcc``, ``f1`` (``spra.metrics.classification``).
    SFT: ``loss`` (mean negative log-likelihood per response token) and ``token_accuracy``.
  """
  if task == "classification":
    predictions, labels = [], []
    for real, batch in padded_batches(arrays, batch_size, limit):
      logits = _host.to_host(predict(batch))  # gathered when the batch spans several processes
      predictions.append(logits[:real].argmax(-1))
      labels.append(batch["labels"][:real])
    return metrics_lib.classification(np.concatenate(labels), np.concatenate(predictions))
  if task != "sft":
    raise ValueError(f"task must be 'classification' or 'sft', got {task!r}")
  total_loss = correct = count = 0.0
  for real, batch in padded_batches(arrays, batch_size, limit):
    logits = _host.to_host(predict(batch)).astype(np.float32)[:real, :-1]
    targets = batch["input_ids"][:real, 1:]
    weights = batch["loss_mask"][:real, 1:].astype(np.float32)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    total_loss += float((nll * weights).sum())
    correct += float(((logits.argmax(-1) == targets) * weights).sum())
    count += float(weights.sum())
  return {"loss": total_loss / max(count, 1), "token_accuracy": correct / max(count, 1)}


def majority_rate(labels: np.ndarray) -> float:
  """The accuracy of always predicting the most frequent label: the floor a classifier must beat.

  >>> majority_rate(np.array([0, 1, 1, 2]))
  0.5
  """
  labels = np.asarray(labels)
  return float(np.bincount(labels).max() / len(labels))
