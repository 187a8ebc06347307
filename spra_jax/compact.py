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

from typing import Any

import jax
import jax.numpy as jnp

from spra_jax.masks import FROZEN, FULL, LeafMask, is_leaf_mask

__all__ = ["gather", "scatter", "scatter_add", "map_leaves", "INDEX_HINTS"]

# Mask indices are validated to be sorted, unique and in range; telling XLA so
# lets it skip bounds handling and collision logic in gathers and scatters.
INDEX_HINTS = dict(mode="promise_in_bounds", unique_indices=True, indices_are_sorted=True)



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
  return jnp.reshape(x, (-1,)).at[m.indices].get(**INDEX_HINTS)


def gather(tree: Any, mask: Any) -> Any:
  """The compact tree of ``tree``'s trainable entries under ``mask``.

  Leaves may be arrays or ``jax.ShapeDtypeStruct`` (then the result holds
  ``ShapeDtypeStruct`` of the compact shapes).
  """
  return map_leaves(_gather_leaf, mask, tree)


def _scatter_leaf(m: LeafMask, v: Any, like: Any) -> Any:
  dtype = like.dtype
  if m.kind == FROZEN:
    return jnp.zeros(m.shape, dtype)
  if m.kind == FULL:
    return jnp.asarray(v, dtype)
  flat = jnp.zeros((m.size,), dtype)
  flat = flat.at[m.indices].set(jnp.asarray(v, dtype), **INDEX_HINTS)
  return flat.reshape(m.shape)


def scatter(compact: Any, mask: Any, like: Any) -> Any:
  """A dense tree that is ``compact`` on the mask and exactly zero elsewhere.

  ``like`` gives each leaf's dtype (e.g. the incoming gradients).
  """
  return map_leaves(_scatter_leaf, mask, compact, like)


def _scatter_add_leaf(m: LeafMask, x: Any, v: Any) -> Any:
  if m.kind == FROZEN:
    return x
  if m.kind == FULL:
    return (x + v).astype(x.dtype)
  flat = jnp.reshape(x, (-1,))
  flat = flat.at[m.indices].add(v.astype(x.dtype), **INDEX_HINTS)
  return flat.reshape(m.shape)


def scatter_add(tree: Any, compact: Any, mask: Any) -> Any:
  """``tree`` with ``compact`` added at the mask's entries (dtype of ``tree``)."""
  return map_leaves(_scatter_add_leaf, mask, tree, compact)
