"""Re-laying a mask, and the compact state that follows it, onto another shard grid.

A shard-local mask (:class:`spra.LeafMask` with ``blocks``) keeps the optimizer collective-free only on a mesh that
cuts each leaf into the grid it was laid out for. Restored onto another mesh (more or fewer hosts, another axis
layout), its compact vectors would be replicated and every step's gathers would communicate. :func:`relayout`
reorders each sparse leaf's entries for the grid its new sharding cuts (:func:`spra.masks.relayout_leaf`) and
applies the same permutation to every compact ``[k]`` vector that follows the mask: delta values, pending updates,
base entries, float32 masters and the optimizer's moments. The trained entries and their values do not change,
only their order; ``spra.merge`` of the result equals that of the input exactly.

A leaf can be re-laid only when each block of the new grid holds the same number of its entries. That always holds
when every new block is a union of old blocks (fsdp=8 onto fsdp=4, onto data=2 x fsdp=4, onto one device), and
generally does not when the new mesh splits another dimension (rows onto columns): those leaves keep their layout,
which stays correct but communicates (``strict=True`` refuses instead, naming them).

:meth:`spra.checkpoint.TrainCheckpointer.restore` uses this by itself: a checkpoint records the layout its masks were
saved with, and a restore into a state built for another mesh re-lays them for that state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from spra_jax.delta import SparseDelta
from spra_jax.lean import LeanState
from spra_jax.masks import SPARSE, LeafMask, block_grid, compact_sharding, is_leaf_mask, path_str, relayout_leaf
from spra_jax.sharding.mesh import _is_sharding
from spra_jax.sharding.state import _suffix_finder
from spra_jax.transform import SparseMaskedState, without_variables

__all__ = ["relayout"]  # (map_compact and relayout_masks serve TrainCheckpointer.restore)

# One re-laid sparse leaf: its new mask and the permutation of its compact vectors.
_Plan = dict[str, tuple[LeafMask, np.ndarray]]


def _is_node(x: Any) -> bool:
  return isinstance(x, (LeanState, SparseMaskedState, SparseDelta))


def _mask_of(node: Any) -> Any:
  return node.delta.mask if isinstance(node, LeanState) else node.mask


def _place(host: np.ndarray, sharding: Any) -> Any:
  """``host`` (the same on every process) placed with ``sharding`` (the default device for None)."""
  if not isinstance(sharding, jax.sharding.Sharding):
    return jax.numpy.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _permute(x: Any, perm: np.ndarray, sharding: Any = None) -> Any:
  """``x[perm]`` for a compact vector, placed with ``sharding`` (default: ``x``'s own); no host copy of ``x``."""
  target = sharding if sharding is not None else getattr(x, "sharding", None)
  if not isinstance(target, jax.sharding.Sharding) or not isinstance(x, jax.Array):
    return jax.numpy.asarray(x)[perm]
  return jax.jit(lambda v: v[perm], out_shardings=target)(x)


def map_compact(node: Any, touched: Any, mask_fn: Callable[[str, LeafMask], LeafMask],
                value_fn: Callable[[str, LeafMask, Any], Any]) -> Any:
  """``node`` (a LeanState, SparseMaskedState or SparseDelta) with the sparse mask leaves at ``touched`` paths
  replaced by ``mask_fn(path, leaf)`` and every compact vector that follows them by ``value_fn(path, leaf, x)``.

  The compact vectors of a leaf: its entries in the delta values, the pending update, the base entries and the
  masters (params-shaped compact trees), and each optimizer-state leaf whose path ends with the leaf's path and
  whose shape is ``[k]`` (AdamW's ``mu``/``nu``), as :func:`spra.sharding.opt_state_shardings` finds them.
  """
  if not touched:
    return node
  mask = _mask_of(node)
  leaves = {path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf_mask)[0]}

  def new_mask(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, m: mask_fn(path_str(path), m) if path_str(path) in touched else m, tree, is_leaf=is_leaf_mask)

  def compact_tree(tree):
    if tree is None:
      return None
    return jax.tree_util.tree_map_with_path(
        lambda path, x: value_fn(path_str(path), leaves[path_str(path)], x)
        if path_str(path) in touched and x is not None else x, tree)

  # An optimizer-state leaf follows the touched leaf whose path is the longest suffix of its own, at its [k] shape.
  owner = _suffix_finder([(p, (leaves[p].num_trainable,), p) for p in touched])

  def opt_tree(tree):
    def one(path, x):
      p = owner(path_str(path), tuple(np.shape(x)))
      return x if p is None else value_fn(p, leaves[p], x)

    return jax.tree_util.tree_map_with_path(one, tree)

  if isinstance(node, SparseDelta):
    return SparseDelta(new_mask(node.mask), compact_tree(node.values))
  if isinstance(node, SparseMaskedState):
    return SparseMaskedState(new_mask(node.mask), opt_tree(node.inner_state), compact_tree(node.masters))
  return node._replace(
      delta=map_compact(node.delta, touched, mask_fn, value_fn),
      opt_state=opt_tree(node.opt_state),
      pending=compact_tree(node.pending),
      base=compact_tree(node.base),
  )


def _apply(node: Any, plan: _Plan, sharding_of: Callable[[str, LeafMask, Any], Any]) -> Any:
  """``node`` with the plan's leaves re-laid: new indices placed, compact vectors permuted."""

  def mask_fn(p: str, m: LeafMask) -> LeafMask:
    new, _ = plan[p]
    target = sharding_of(p, new, m.indices)
    indices = _place(np.asarray(new.indices), target if target is not None else getattr(m.indices, "sharding", None))
    return LeafMask.sparse(new.shape, indices, blocks=new.blocks)

  def value_fn(p: str, m: LeafMask, x: Any) -> Any:
    new, perm = plan[p]
    return _permute(x, perm, sharding_of(p, new, x))

  return map_compact(node, set(plan), mask_fn, value_fn)


def _plan(mask: Any, target: Callable[[str, LeafMask], Any], *, strict: bool, where: str) -> _Plan:
  """For each sparse leaf whose layout differs from ``target(path, m)``: the new mask and permutation."""
  plan: _Plan = {}
  refused = []
  for path, m in jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf_mask)[0]:
    if not isinstance(m, LeafMask) or m.kind != SPARSE or m.num_trainable == 0:
      continue
    p, blocks = path_str(path), target(path_str(path), m)
    if blocks == m.blocks:
      continue
    try:
      plan[p] = relayout_leaf(m, blocks)
    except ValueError as e:
      refused.append((p, str(e)))
  if refused:
    names = ", ".join(repr(p) for p, _ in refused[:6]) + (f", … ({len(refused)} leaves)" if len(refused) > 6 else "")
    detail = refused[0][1]
    if strict:
      raise ValueError(f"{where}: {len(refused)} mask leaves cannot be laid out shard-locally for the new grid "
                       f"({names}); {detail}")
    warnings.warn(
        f"{where}: {len(refused)} mask leaves keep their old layout ({names}): {detail} Training stays correct, "
        "but their optimizer gathers communicate on this mesh.", stacklevel=3)
  return plan


def relayout_masks(state: Any, target: Callable[[str, LeafMask], Any], *, strict: bool = False,
                   sharding_of: Callable[[str, LeafMask, Any], Any] | None = None, where: str = "relayout") -> Any:
  """The engine of :func:`relayout`: re-lays every mask in ``state`` for the grid ``target(path, leaf)`` names.

  ``state`` is any pytree holding ``spra.LeanState``, ``spra.SparseMaskedState`` or ``spra.SparseDelta`` nodes
  (each re-laid with every compact vector it holds); other leaves pass through. ``sharding_of(path, new_leaf, x)``
  gives the sharding of the re-laid array ``x`` (default: the one it has). Collective on a multi-process cluster.
  """
  sharding_of = sharding_of or (lambda p, m, x: None)

  def one(node):
    if not _is_node(node):
      return node
    return _apply(node, _plan(_mask_of(node), target, strict=strict, where=where), sharding_of)

  return jax.tree.map(one, state, is_leaf=_is_node)


def relayout(state: Any, param_shardings: Any, *, strict: bool = True) -> Any:
  """``state`` with every shard-local mask re-laid for the grid ``param_shardings`` cut its leaves into.

  Use it after restoring a state onto another mesh (``TrainCheckpointer.restore`` does it by itself when the
  target state was built on that mesh), or before moving a run to another mesh: the update then stays
  collective-free there. Every compact ``[k]`` vector that follows a re-laid leaf (delta values, pending update,
  base entries, masters, optimizer moments) is permuted with it and placed with the compact sharding of the new
  grid (:func:`spra.masks.compact_sharding`); a leaf the new sharding does not split gets one block (globally
  sorted indices). Nothing else in ``state`` moves: put the parameters on the new mesh yourself.

  Args:
    state: a ``spra.LeanState``, ``spra.SparseMaskedState``, ``spra.SparseDelta``, or any pytree holding them
      (e.g. ``{'params': ..., 'opt_state': ...}``). Its arrays may span several processes.
    param_shardings: the parameters' shardings on the new mesh (``spra.sharding.param_shardings``), a tree with
      the structure of the masks' parameters.
    strict: raise when a leaf cannot be laid out shard-locally for its new grid (its entries do not fall evenly
      into the new blocks); with False such leaves keep their layout, with a warning naming them.

  Returns:
    The re-laid state (the input is not changed). Collective on a multi-process cluster (every process calls it).

  Raises:
    ValueError: with ``strict``, a leaf that cannot be re-laid (the message names it and gives the spread);
      ``param_shardings`` does not have the masks' structure.

  Example:

    >>> import jax, jax.numpy as jnp, optax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import spra_jax as spra
    >>> mesh = spra.sharding.make_mesh()
    >>> params = {'w': jnp.ones((8, 4))}
    >>> mask = {'w': spra.LeafMask.sparse((8, 4), jnp.array([0, 9, 18, 27], jnp.int32), blocks=(4, 1))}
    >>> tx = spra.masked(optax.adam(1e-2), mask)
    >>> state = relayout(tx.init(params), {'w': NamedSharding(mesh, P())})  # one device: one block
    >>> spra.mask_of(state)['w']
    LeafMask.sparse(shape=(8, 4), k=4)
  """
  param_shardings = without_variables(param_shardings)
  param_def = jax.tree.structure(param_shardings, is_leaf=_is_sharding)
  flat_shardings = param_def.flatten_up_to(param_shardings)
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(param_shardings, is_leaf=_is_sharding)[0]]
  by_path = dict(zip(paths, flat_shardings))
  for node in jax.tree.leaves(state, is_leaf=_is_node):
    if _is_node(node) and jax.tree.structure(_mask_of(node), is_leaf=is_leaf_mask) != param_def:
      raise ValueError("param_shardings must have the structure of the parameters the masks in state were sampled on.")

  def target(path: str, m: LeafMask):
    return block_grid(m.shape, by_path[path])

  def sharding_of(path: str, m: LeafMask, x: Any):
    s = by_path[path]
    if m.blocks is not None and m.blocks == block_grid(m.shape, s):
      return compact_sharding(s)
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec()) if hasattr(s, "mesh") else None

  return relayout_masks(state, target, strict=strict, sharding_of=sharding_of, where="spra.sharding.relayout")
