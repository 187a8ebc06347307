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


def padded_batches(arrays: Mapping[str, np.ndarray] | data_lib.TokenizedSplit, batch_size: int, limit: int = 0, *,
                   share: slice | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """``(real_rows, batch)`` over every row once, in order; the last batch is padded to ``batch_size``.

  ``limit`` > 0 stops after that many rows. ``share`` yields only those rows of each (padded) batch: a process's
  share of the global batch on a cluster; ``real_rows`` still counts the whole batch's real rows.

  >>> [(real, b["x"].tolist()) for real, b in padded_batches({"x": np.arange(5)}, 2)]
  [(2, [0, 1]), (2, [2, 3]), (1, [4, 4])]
  """
  n = data_lib.num_rows(arrays)
  n = min(n, limit) if limit else n
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    real = len(rows)
    rows = np.concatenate([rows, np.full(batch_size - real, rows[-1])])
    yield real, data_lib.take(arrays, rows if share is None else rows[share])


def evaluate(predict: Callable[[Mapping[str, Any]], Any], arrays: Mapping[str, np.ndarray] | data_lib.TokenizedSplit,
             *, task: str, batch_size: int, limit: int = 0, share: slice | None = None) -> dict[str, float]:
  """The metrics of ``predict`` on ``arrays`` (the first ``limit`` rows; 0 = all).

  On a multi-process cluster each process scores the rows of the output it holds and the per-row results (a few
  numbers per row, never the logits) are gathered, so every process returns the same metrics (collective then).

  Args:
    predict: ``predict(batch) -> logits``; classification logits are
      ``[batch, classes]``, SFT logits ``[batch, length, vocab]`` (a global array on a cluster).
    arrays: a tokenised split (``spra.data.tokenize_classification`` or ``tokenize_sft``, or a
      ``spra.data.TokenizedSplit``).
    task: ``'classification'`` or ``'sft'``.
    batch_size: rows per call of ``predict`` (the global batch on a cluster).
    limit: score only the first ``limit`` rows (0 = all).
    share: the rows of each batch this process feeds ``predict`` (its share of the global batch on a cluster,
      ``spra.sharding.process_rows``); None: whole batches.

  Returns:
    Classification: ``accuracy``, ``mcc``, ``f1`` (``spra.metrics.classification``).
    SFT: ``loss`` (mean negative log-likelihood per response token) and ``token_accuracy``.
  """
  if task not in ("classification", "sft"):
    raise ValueError(f"task must be 'classification' or 'sft', got {task!r}")
  first = 0 if share is None else (share.start or 0)
  per_row = []
  for real, batch in padded_batches(arrays, batch_size, limit, share=share):
    rows, logits = _host.local_rows(predict(batch))  # this process's rows of the output
    mine = {k: np.asarray(v)[rows.start - first: rows.stop - first] for k, v in batch.items()}
    stats = _classification_rows(logits, mine) if task == "classification" else _sft_rows(logits, mine)
    per_row.append(_host.gather_rows(stats, rows, batch_size)[:real])
  stats = np.concatenate(per_row)
  if task == "classification":
    return metrics_lib.classification(stats[:, 1].astype(np.int64), stats[:, 0].astype(np.int64))
  loss, correct, count = stats.sum(0)
  return {"loss": float(loss / max(count, 1)), "token_accuracy": float(correct / max(count, 1))}


def _classification_rows(logits: np.ndarray, batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """Per row: (predicted class, label)."""
  return np.stack([np.asarray(logits).argmax(-1), batch["labels"]], axis=1).astype(np.int64)


def _sft_rows(logits: np.ndarray, batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """Per row: (summed response-token NLL, correct response tokens, response tokens), in float64."""
  logits = np.asarray(logits).astype(np.float32)[:, :-1]
  targets = batch["input_ids"][:, 1:]
  weights = batch["loss_mask"][:, 1:].astype(np.float32)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  return np.stack([(nll * weights).sum(1), ((logits.argmax(-1) == targets) * weights).sum(1), weights.sum(1)],
                  axis=1).astype(np.float64)


def majority_rate(labels: np.ndarray) -> float:
  """The accuracy of always predicting the most frequent label: the floor a classifier must beat.

  >>> majority_rate(np.array([0, 1, 1, 2]))
  0.5
  """
  labels = np.asarray(labels)
  return float(np.bincount(labels).max() / len(labels))
