"""Moving between dense parameter trees and compact trees over a mask.

A *compact tree* has the structure of the parameters, but holds per leaf only
what trains: a ``[k]`` vector for a sparse leaf (its entries at the mask's
indices), the whole array for a full leaf, and ``None`` (an empty subtree) for
a frozen leaf. Optimizer state built on a compact tree is therefore O(k).

Example:

  >>> import jax.numpy as jnp
  >>> from spra_jax.masks import LeafMask
  >>> mask = {'w': LeafMask.sparse((2, 3), jnp.array([1, 5], jnp.int32)),
  ...         'b': LeafMask.frozen((3,))}
  >>> params = {'w': jnp.arange(6.).reshape(2, 3), 'b': jnp.ones(3)}
  >>> gather(params, mask)
  {'b': None, 'w': Array([1., 5.], dtype=float32)}
  >>> scatter(gather(params, mask), mask, params)['w']
  Array([[0., 1., 0.],
         [0., 0., 5.]], dtype=float32)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from spra_jax.masks import FROZEN, FULL, LeafMask, is_leaf_mask

__all__ = ["gather", "scatter", "scatter_add", "map_leaves", "take", "put", "INDEX_HINTS"]

# Mask indices are validated to be sorted, unique and in range; telling XLA so
# lets it skip bounds handling and collision logic in gathers and scatters.
INDEX_HINTS = dict(mode="promise_in_bounds", unique_indices=True, indices_are_sorted=True)


# Shard-local masks (``LeafMask.blocks``): the leaf is viewed as [num_blocks,
# block_size] in block-major order, by a reshape/transpose that only relabels a
# sharded array's local pieces, and each block gathers or scatters its own
# slice of the indices. Gather and scatter then have a batch dimension that is
# sharded alike on the leaf, the indices and the values, so XLA's SPMD
# partitioner runs them on each device's own shard, with no communication.


def _to_blocks(x: jax.Array, blocks: tuple[int, ...]) -> jax.Array:
  shape = x.shape
  split = [d for s, b in zip(shape, blocks) for d in (b, s // b)]
  order = list(range(0, 2 * len(shape), 2)) + list(range(1, 2 * len(shape), 2))
  return jnp.reshape(x, split).transpose(order).reshape(math.prod(blocks), -1)


def _from_blocks(y: jax.Array, shape: tuple[int, ...], blocks: tuple[int, ...]) -> jax.Array:
  n = len(shape)
  y = jnp.reshape(y, tuple(blocks) + tuple(s // b for s, b in zip(shape, blocks)))
  order = [i for d in range(n) for i in (d, n + d)]
  return y.transpose(order).reshape(shape)


def _local_indices(m: LeafMask) -> jax.Array:
  """Each index's flat position inside its own block, as [num_blocks, k / num_blocks]."""
  local_shape = tuple(s // b for s, b in zip(m.shape, m.blocks))
  rest, local, scale = m.indices, jnp.zeros_like(m.indices), 1
  for d in reversed(range(len(m.shape))):
    local = local + (rest % m.shape[d]) % local_shape[d] * scale
    rest = rest // m.shape[d]
    scale *= local_shape[d]
  return local.reshape(m.num_blocks, -1)


def take(x: jax.Array, m: LeafMask) -> jax.Array:
  """The ``[k]`` entries of leaf ``x`` at a sparse mask's indices, in the mask's order.

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import LeafMask
    >>> x = jnp.arange(8.).reshape(2, 4)
    >>> take(x, LeafMask.sparse((2, 4), jnp.array([4, 1, 3, 6], jnp.int32), blocks=(1, 2)))
    Array([4., 1., 3., 6.], dtype=float32)
  """
  return _take(jnp.asarray(x), m)  # numpy arrays (and scalars) have no ``.at``; jnp.reshape keeps numpy as numpy


# ``take`` and ``put`` are each one compiled program per leaf shape and mask size: called eagerly (merging, extracting,
# restoring), their handful of reshapes, index arithmetic and the gather or scatter would otherwise compile one
# program each, per shape. Inside a jitted step they inline as before.
@jax.jit
def _take(x: jax.Array, m: LeafMask) -> jax.Array:
  if m.blocks is None:
    return jnp.reshape(x, (-1,)).at[m.indices].get(**INDEX_HINTS)
  rows = _to_blocks(x, m.blocks)
  picked = jax.vmap(lambda row, idx: row.at[idx].get(**INDEX_HINTS))(rows, _local_indices(m))
  return picked.reshape(-1)


def put(x: jax.Array, m: LeafMask, values: jax.Array, *, add: bool = False) -> jax.Array:
  """Leaf ``x`` with ``values`` written (or added, with ``add``) at a sparse mask's indices.

  Example:

    >>> import jax.numpy as jnp
    >>> from spra_jax.masks import LeafMask
    >>> m = LeafMask.sparse((2, 4), jnp.array([4, 1, 3, 6], jnp.int32), blocks=(1, 2))
    >>> put(jnp.zeros((2, 4)), m, jnp.array([1., 2., 3., 4.]))
    Array([[0., 2., 0., 3.],
           [1., 0., 4., 0.]], dtype=float32)
  """
  x = jnp.asarray(x)
  return _put(x, m, jnp.asarray(values, x.dtype), add=add)


@functools.partial(jax.jit, static_argnames="add")
def _put(x: jax.Array, m: LeafMask, values: jax.Array, *, add: bool) -> jax.Array:
  if m.blocks is None:
    at = jnp.reshape(x, (-1,)).at[m.indices]
    return (at.add(values, **INDEX_HINTS) if add else at.set(values, **INDEX_HINTS)).reshape(m.shape)

  def one(row, idx, v):
    return row.at[idx].add(v, **INDEX_HINTS) if add else row.at[idx].set(v, **INDEX_HINTS)

  rows = jax.vmap(one)(_to_blocks(x, m.blocks), _local_indices(m), values.reshape(m.num_blocks, -1))
  return _from_blocks(rows, m.shape, m.blocks)



def map_leaves(fn, mask: Any, *trees: Any) -> Any:
  """Maps ``fn(leaf_mask, *leaves)`` over a mask and trees of its structure.

  The trees may be dense (parameter-shaped) or compact; each is flattened up to
  the mask's structure, so a ``None`` in a compact tree reaches ``fn`` as None.
  """
  mask_def = jax.tree.structure(mask, is_leaf=is_leaf_mask)
  leaf_masks = mask_def.flatten_up_to(mask)
  flat = [mask_def.flatten_up_to(t) for t in trees]
  return mask_def.unflatten([fn(m, *xs) for m, *xs in zip(leaf_masks, *flat)])


def _gather_leaf(m: LeafMask, x: Any) -> Any:
  if m.kind == FROZEN:
    return None
  if m.kind == FULL:
    return x
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((m.num_trainable,), x.dtype)
  return take(x, m)


def gather(tree: Any, mask: Any) -> Any:
  """The compact tree of ``tree``'s trainable entries under ``mask``.

  Leaves may be arrays or ``jax.ShapeDtypeStruct`` (then the result holds
  ``ShapeDtypeStruct`` of the compact shapes).
  """
  return map_leaves(_gather_leaf, mask, tree)


def _dtype(x: Any) -> Any:
  """The dtype of an array, ``ShapeDtypeStruct`` or array-like (a Python scalar or list)."""
  return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def _scatter_leaf(m: LeafMask, v: Any, like: Any) -> Any:
  dtype = _dtype(like)
  if m.kind == FROZEN:
    return jnp.zeros(m.shape, dtype)
  if m.kind == FULL:
    return jnp.asarray(v, dtype)
  return put(jnp.zeros(m.shape, dtype), m, jnp.asarray(v, dtype))


def scatter(compact: Any, mask: Any, like: Any) -> Any:
  """A dense tree that is ``compact`` on the mask and exactly zero elsewhere.

  ``like`` gives each leaf's dtype (e.g. the incoming gradients). Leaves may
  be any array-like (numpy arrays, Python scalars); the result holds jax arrays.
  """
  return map_leaves(_scatter_leaf, mask, compact, like)


def _scatter_add_leaf(m: LeafMask, x: Any, v: Any) -> Any:
  if m.kind == FROZEN:
    return jnp.asarray(x)
  if m.kind == FULL:
    return jnp.asarray(x + v, _dtype(x))
  return put(x, m, v, add=True)


def scatter_add(tree: Any, compact: Any, mask: Any) -> Any:
  """``tree`` with ``compact`` added at the mask's entries (dtype of ``tree``; jax arrays, for array-like leaves too)."""
  return map_leaves(_scatter_add_leaf, mask, tree, compact)
