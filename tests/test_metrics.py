"""spra_jax.metrics agrees with scikit-learn's definitions."""

import numpy as np
import pytest

from spra_jax import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn (the 'examples' extra) is the reference")


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_against_sklearn(num_classes):
  rng = np.random.default_rng(num_classes)
  y = rng.integers(0, num_classes, 500)
  p = np.where(rng.random(500) < 0.6, y, rng.integers(0, num_classes, 500))
  got = metrics.classification(y, p)
  average = "binary" if num_classes == 2 else "macro"
  assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p), abs=1e-12)
  assert got["mcc"] == pytest.approx(sklearn_metrics.matthews_corrcoef(y, p), abs=1e-12)
  assert got["f1"] == pytest.approx(sklearn_metrics.f1_score(y, p, average=average), abs=1e-12)


def test_degenerate_predictions():
  y = [0, 1, 1, 0]
  assert metrics.mcc(y, [1, 1, 1, 1]) == 0.0  # a constant predictor carries no correlation
  assert metrics.f1(y, [0, 0, 0, 0]) == 0.0
  assert metrics.mcc(y, [1, 0, 0, 1]) == -1.0


def test_errors():
  with pytest.raises(ValueError, match="same length, got 2 and 3"):
    metrics.accuracy([0, 1], [0, 1, 1])
  with pytest.raises(ValueError, match="'binary' or 'macro'"):
    metrics.f1([0, 1], [0, 1], average="micro")
