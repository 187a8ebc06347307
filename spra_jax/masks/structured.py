"""Structured and score-based distributions, for ablations: whole rows, whole columns, tiles, and the top-k entries
of a score per leaf (weight magnitudes, a Fisher information estimate).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spra_jax.masks._allocation import _round_half_up
from spra_jax.masks._choice import _choose_sorted
from spra_jax.masks.distributions import Distribution, register
from spra_jax.masks.leaf import _example_paths, path_str

__all__ = [
    "Blocks",
    "Columns",
    "Rows",
    "TopK",
    "blocks",
    "columns",
    "fisher_scores",
    "magnitude",
    "rows",
    "top_k",
]


def _lines_count(budget: int, line: int, lines: int) -> int:
  """Whole lines of ``line`` entries closest to ``budget`` (at least one if any)."""
  if budget <= 0:
    return 0
  return min(lines, max(1, _round_half_up(budget / line)))


def _whole_lines(minimum: int, line: int) -> int:
  """The budget of the fewest whole lines of ``line`` entries that hold ``minimum`` entries."""
  return -(-int(minimum) // line) * line


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
  """A leaf seen as a matrix: its first axis by the product of the others."""
  return shape[0], math.prod(shape[1:])


@register
class Rows(Distribution):
  """Whole rows (entries sharing their first index), chosen uniformly.

  A kernel ``[in, out]`` then trains every output weight of a few input
  features. The count is rounded to whole rows (at least one when the budget
  is positive), so ``exact`` is False; ``sample_mask(..., min_per_leaf=m)``
  gives a leaf the fewest whole rows that hold m entries. 1-D leaves fall back
  to single entries.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> from spra_jax.masks import sample_mask
    >>> m = sample_mask(jax.random.key(0), {'w': jnp.zeros((100, 50))}, rows(0.02))
    >>> m['w'].num_trainable, len(set((m['w'].indices // 50).tolist()))
    (100, 2)
  """

  name = "rows"
  exact = False

  def sample(self, key, path, shape, budget):
    if len(shape) < 2:
      return _choose_sorted(key, math.prod(shape), int(budget))
    n_rows, row = _as_matrix(shape)
    chosen = _choose_sorted(key, n_rows, _lines_count(int(budget), row, n_rows))
    return (chosen[:, None] * row + jnp.arange(row, dtype=jnp.int32)[None, :]).reshape(-1)

  def min_budget(self, shape, minimum):
    if len(shape) < 2:
      return int(minimum)
    return _whole_lines(minimum, _as_matrix(shape)[1])


@register
class Columns(Distribution):
  """Whole columns (entries sharing their last index), chosen uniformly.

  A kernel ``[in, out]`` then trains every input weight of a few output
  units. Counts are rounded to whole columns (``min_per_leaf``: the fewest
  that hold the minimum); 1-D leaves fall back to single entries.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> from spra_jax.masks import sample_mask
    >>> m = sample_mask(jax.random.key(0), {'w': jnp.zeros((100, 50))}, columns(0.04))
    >>> m['w'].num_trainable, len(set((m['w'].indices % 50).tolist()))
    (200, 2)
  """

  name = "columns"
  exact = False

  def sample(self, key, path, shape, budget):
    if len(shape) < 2:
      return _choose_sorted(key, math.prod(shape), int(budget))
    n_cols = shape[-1]
    col = math.prod(shape) // n_cols
    chosen = _choose_sorted(key, n_cols, _lines_count(int(budget), col, n_cols))
    # Row-major flat indices: every chosen column in each row, rows in order: sorted.
    return (jnp.arange(col, dtype=jnp.int32)[:, None] * n_cols + chosen[None, :]).reshape(-1)

  def min_budget(self, shape, minimum):
    if len(shape) < 2:
      return int(minimum)
    return _whole_lines(minimum, math.prod(shape) // shape[-1])


@register
class Blocks(Distribution):
  """Random ``block``-shaped tiles of each leaf (seen as a matrix), uniformly.

  Tiles align with a ``block[0] × block[1]`` grid, as a matmul kernel's tiles
  do; edge tiles are clipped. The count is rounded to whole tiles (at least
  one when the budget is positive; with ``min_per_leaf``, enough tiles to hold
  the minimum even if they are all the clipped corner one's size). 1-D leaves
  fall back to single entries.

  Args:
    density: see :class:`Distribution`.
    block: the tile shape (rows, columns).

  Example:

    >>> import jax, jax.numpy as jnp
    >>> from spra_jax.masks import sample_mask
    >>> m = sample_mask(jax.random.key(0), {'w': jnp.zeros((64, 64))}, blocks(0.0625, block=(8, 8)))
    >>> m['w'].num_trainable, len({(int(i) // 64 // 8, int(i) % 64 // 8) for i in m['w'].indices})
    (256, 4)
  """

  name = "blocks"
  exact = False

  def __init__(self, density: float, *, block: tuple[int, int] = (16, 16), **kwargs: Any):
    super().__init__(density, **kwargs)
    block = tuple(int(b) for b in block)
    if len(block) != 2 or min(block) < 1:
      raise ValueError(f"block must be two positive ints (rows, columns), got {block!r}.")
    self.block = block

  def sample(self, key, path, shape, budget):
    if len(shape) < 2:
      return _choose_sorted(key, math.prod(shape), int(budget))
    n_rows, n_cols = _as_matrix(shape)
    br, bc = min(self.block[0], n_rows), min(self.block[1], n_cols)
    grid_r, grid_c = -(-n_rows // br), -(-n_cols // bc)
    tiles = np.asarray(_choose_sorted(key, grid_r * grid_c, _lines_count(int(budget), br * bc, grid_r * grid_c)))
    rows = (tiles // grid_c)[:, None] * br + np.arange(br)[None, :]   # [tiles, br]
    cols = (tiles % grid_c)[:, None] * bc + np.arange(bc)[None, :]    # [tiles, bc]
    flat = rows[:, :, None] * n_cols + cols[:, None, :]
    valid = (rows[:, :, None] < n_rows) & (cols[:, None, :] < n_cols)
    return jnp.asarray(np.sort(flat[valid]).astype(np.int32))

  def min_budget(self, shape, minimum):
    if len(shape) < 2:
      return int(minimum)
    n_rows, n_cols = _as_matrix(shape)
    br, bc = min(self.block[0], n_rows), min(self.block[1], n_cols)
    # Any tile may be the clipped corner one, so count enough of the smallest tiles; the sampler rounds the budget
    # to whole full-size tiles, hence the budget of that many full tiles (capped at the grid by the sampler).
    smallest = (n_rows % br or br) * (n_cols % bc or bc)
    return -(-int(minimum) // smallest) * br * bc

  def spec(self) -> dict[str, Any]:
    return {**super().spec(), "block": list(self.block)}


class TopK(Distribution):
  """The ``budget`` entries of each leaf with the largest (or smallest) score.

  Scores are data, not randomness: magnitudes of the pretrained weights
  (:func:`magnitude`), a Fisher information estimate (:func:`fisher_scores`,
  as the FISH mask does), or any array per leaf. Ties go to the lower index.
  The key is unused. Memory is O(leaf size) for the leaf being ranked.

  Args:
    density: see :class:`Distribution`.
    scores: a pytree with the structure (or at least the eligible leaves) of
      the params, holding one score array per leaf of the leaf's shape.
    largest: take the largest scores (True) or the smallest (False).

  Example:

    >>> import jax, jax.numpy as jnp
    >>> from spra_jax.masks import sample_mask
    >>> w = {'w': jnp.array([[0.1, -3.0], [2.0, 0.0]])}
    >>> sample_mask(0, w, top_k(0.5, jax.tree.map(jnp.abs, w)))['w'].indices.tolist()
    [1, 2]
  """

  name = "top-k"

  def __init__(self, density: float, scores: Any, *, largest: bool = True, **kwargs: Any):
    super().__init__(density, **kwargs)
    flat, _ = jax.tree_util.tree_flatten_with_path(scores)
    self._scores = {path_str(p): leaf for p, leaf in flat}
    self.largest = bool(largest)

  def sample(self, key, path, shape, budget):
    if path not in self._scores:
      raise ValueError(f"top-k scores have no leaf {path!r}; they have {_example_paths(sorted(self._scores))}.")
    score = jnp.asarray(self._scores[path])
    if score.shape != tuple(shape):
      raise ValueError(f"top-k scores at {path!r} have shape {score.shape}, expected the leaf's shape {tuple(shape)}.")
    flat = score.reshape(-1).astype(jnp.float32)
    _, idx = jax.lax.top_k(flat if self.largest else -flat, int(budget))
    return jnp.sort(idx.astype(jnp.int32))

  def spec(self) -> dict[str, Any]:
    return {**super().spec(), "largest": self.largest}


def rows(density: float, **kwargs: Any) -> Rows:
  """Whole rows of each leaf; see :class:`Rows`."""
  return Rows(density, **kwargs)


def columns(density: float, **kwargs: Any) -> Columns:
  """Whole columns of each leaf; see :class:`Columns`."""
  return Columns(density, **kwargs)


def blocks(density: float, *, block: tuple[int, int] = (16, 16), **kwargs: Any) -> Blocks:
  """Random tiles of each leaf; see :class:`Blocks`."""
  return Blocks(density, block=block, **kwargs)


def top_k(density: float, scores: Any, *, largest: bool = True, **kwargs: Any) -> TopK:
  """The highest- (or lowest-) scoring entries of each leaf; see :class:`TopK`."""
  return TopK(density, scores, largest=largest, **kwargs)


def magnitude(density: float, params: Any, *, largest: bool = True, **kwargs: Any) -> TopK:
  """The entries of largest (or smallest) absolute value in the given weights.

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import sample_mask
    >>> p = {'w': jnp.array([0.5, -2.0, 0.1, 1.0])}
    >>> sample_mask(0, p, magnitude(0.5, p, largest=False))['w'].indices.tolist()
    [0, 2]
  """
  return TopK(density, jax.tree.map(jnp.abs, params), largest=largest, **kwargs)


@functools.lru_cache(maxsize=8)
def _cached_grad(loss_fn: Callable[..., jax.Array]) -> Callable:
  return jax.jit(jax.grad(loss_fn))


def _jitted_grad(loss_fn: Callable[..., jax.Array]) -> Callable:
  """One compiled gradient per loss function (the last few kept), so the Fisher scores of every run of a sweep
  compile once."""
  try:
    return _cached_grad(loss_fn)
  except TypeError:  # an unhashable callable: no cache
    return jax.jit(jax.grad(loss_fn))


def fisher_scores(loss_fn: Callable[..., jax.Array], params: Any, batches: Any) -> Any:
  """A diagonal empirical Fisher estimate: squared gradients summed over batches.

  ``loss_fn(params, *batch)`` is the mean loss of a batch; ``batches`` is an
  iterable of argument tuples. This is the batch-level estimate (one squared
  gradient per batch); with batches of one example it is the per-example
  estimate the FISH mask uses. It forms dense gradients, so it costs what one
  full fine-tuning step costs, once per batch. Use with :func:`top_k`.

  Example:

    >>> import jax.numpy as jnp
    >>> loss = lambda p, x: jnp.sum(p['w'] * x) ** 2
    >>> s = fisher_scores(loss, {'w': jnp.ones(3)}, [(jnp.array([1., 0., 0.]),), (jnp.array([0., 2., 0.]),)])
    >>> s['w'].tolist()
    [4.0, 64.0, 0.0]
  """
  grad = _jitted_grad(loss_fn)
  total = None
  for batch in batches:
    g = grad(params, *(batch if isinstance(batch, tuple) else (batch,)))
    sq = jax.tree.map(lambda x: jnp.square(x.astype(jnp.float32)), g)
    total = sq if total is None else jax.tree.map(jnp.add, total, sq)
  if total is None:
    raise ValueError("fisher_scores needs at least one batch.")
  return total
