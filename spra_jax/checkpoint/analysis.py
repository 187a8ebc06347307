"""Several sparse adapters together: how much they overlap, and the base plus all of them.

* :func:`adapter_overlap`: shared trained entries of two adapters, per leaf and
  in total, next to what independent uniform masks of the same sizes would share;
* :func:`merge_adapters`: the base weights plus several adapters, summed over the
  union of their indices and merged once.

Every function takes deltas, masks or adapter directories; directories are read
with the same checks as :func:`~spra_jax.load_adapter` (checksums, leaf table,
and the base fingerprint where base weights are given).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from spra_jax import _host
from spra_jax.checkpoint import _files, _format
from spra_jax.checkpoint.adapter import load_adapter
from spra_jax.delta import SparseDelta, add_deltas, merge
from spra_jax.masks import FULL, path_str

__all__ = ["AdapterOverlap", "LeafOverlap", "adapter_overlap", "merge_adapters"]


def _as_delta(x: Any, base_params: Any) -> SparseDelta:
  if isinstance(x, SparseDelta):
    return x
  if isinstance(x, (str, os.PathLike)):
    return load_adapter(x, base_params=base_params)
  raise TypeError(f"expected a SparseDelta or an adapter directory, got {type(x).__name__}.")


def merge_adapters(base_params: Any, *adapters: SparseDelta | str | os.PathLike) -> Any:
  """The base weights plus several adapters (deltas or adapter directories).

  Adapter directories are loaded against ``base_params``, so each one's
  fingerprint is checked. The deltas are summed over the union of their
  indices (:func:`spra.add_deltas`) and merged once, so the result does not
  depend on the order of the adapters beyond float32 summation.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> import spra_jax as spra
    >>> base = {'w': jnp.zeros(4)}
    >>> a = spra.SparseDelta({'w': spra.LeafMask.sparse((4,), jnp.array([0, 1], jnp.int32))}, {'w': jnp.ones(2)})
    >>> b = spra.SparseDelta({'w': spra.LeafMask.sparse((4,), jnp.array([1, 3], jnp.int32))}, {'w': jnp.ones(2)})
    >>> spra.merge_adapters(base, a, b)['w'].tolist()
    [1.0, 2.0, 0.0, 1.0]
  """
  if not adapters:
    raise ValueError("merge_adapters needs at least one adapter.")
  deltas = [_as_delta(a, base_params) for a in adapters]
  return merge(base_params, add_deltas(*deltas))


class LeafOverlap(NamedTuple):
  """Index overlap of two adapters on one leaf.

  Attributes:
    k_a: entries the first adapter trains on this leaf.
    k_b: entries the second adapter trains.
    shared: entries both train.
    expected: ``k_a * k_b / size``: the overlap two independent uniform masks
      of these sizes have on average.
  """

  k_a: int
  k_b: int
  shared: int
  expected: float


class AdapterOverlap(NamedTuple):
  """Index overlap of two adapters, per leaf and in total.

  Attributes:
    leaves: ``{path: LeafOverlap}`` for every leaf either adapter trains.
    k_a: total entries of the first adapter.
    k_b: total entries of the second.
    shared: total entries both train.
  """

  leaves: dict[str, LeafOverlap]
  k_a: int
  k_b: int
  shared: int

  @property
  def jaccard(self) -> float:
    """shared / |union|."""
    union = self.k_a + self.k_b - self.shared
    return self.shared / union if union else 0.0

  @property
  def expected(self) -> float:
    """The total overlap expected of independent uniform masks of the same sizes."""
    return sum(leaf.expected for leaf in self.leaves.values())


def _mask_of(x: Any) -> Any:
  if isinstance(x, SparseDelta):
    return x.mask
  if isinstance(x, (str, os.PathLike)):
    # The masks only: no values placed on a device, no template needed.
    _, leaves = _format.read_sparse(_files.absolute(x))
    return {leaf.record["path"]: leaf.mask for leaf in leaves}
  return x


def adapter_overlap(a: Any, b: Any) -> AdapterOverlap:
  """How many trained entries two adapters share, per leaf and in total.

  Args:
    a: a :class:`~spra_jax.SparseDelta`, a mask, or an adapter directory.
    b: the same for the second adapter; leaves are matched by path.

  Returns:
    An :class:`AdapterOverlap`. Independent uniform masks at densities p and q
    share about p·q of each leaf's entries (``expected``); masks drawn with the
    same key share everything.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> import spra_jax as spra
    >>> params = {'w': jnp.zeros((100, 100))}
    >>> a = spra.sample_mask(0, params, density=0.5)
    >>> b = spra.sample_mask(1, params, density=0.5)
    >>> ov = spra.adapter_overlap(a, b)
    >>> ov.k_a, ov.k_b, 2300 < ov.shared < 2700, ov.expected
    (5000, 5000, True, 2500.0)
  """
  flat_a = {path_str(p): m for p, m in _format.flat_masks(_mask_of(a))}
  flat_b = {path_str(p): m for p, m in _format.flat_masks(_mask_of(b))}
  leaves = {}
  for path in sorted(set(flat_a) | set(flat_b)):
    ma, mb = flat_a.get(path), flat_b.get(path)
    if ma is not None and mb is not None and ma.shape != mb.shape:
      raise ValueError(f"leaf {path!r} has shape {ma.shape} in the first adapter and {mb.shape} in the second.")
    ka = ma.num_trainable if ma is not None else 0
    kb = mb.num_trainable if mb is not None else 0
    if ka == 0 and kb == 0:
      continue
    size = (ma or mb).size
    if ka == 0 or kb == 0:
      shared = 0
    elif ma.kind == FULL:
      shared = kb
    elif mb.kind == FULL:
      shared = ka
    else:
      # (gathered from every process when the indices span several)
      shared = int(np.intersect1d(_host.to_host(ma.indices), _host.to_host(mb.indices), assume_unique=True).size)
    leaves[path] = LeafOverlap(ka, kb, shared, ka * kb / size if size else 0.0)
  return AdapterOverlap(
      leaves,
      sum(v.k_a for v in leaves.values()),
      sum(v.k_b for v in leaves.values()),
      sum(v.shared for v in leaves.values()),
  )
