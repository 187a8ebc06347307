"""Shardings of everything SpaRTA adds to a step: masks, deltas, optimizer states, the lean state.

Each follows the parameters' shardings (from :func:`spra.sharding.param_shardings`
or the arrays themselves): a full leaf's values are sharded like its parameter,
a shard-local sparse leaf's compact ``[k]`` vectors by
:func:`spra.masks.compact_sharding`, and everything else (counts, scalars,
sparse leaves that are not shard-local) is replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spra_jax import compact
from spra_jax.delta import SparseDelta
from spra_jax.lean import LeanState
from spra_jax.masks import FROZEN, FULL, LeafMask, block_grid, compact_sharding, is_leaf_mask, path_str
from spra_jax.masks import validate_indices  # the per-slice checks live with the mask format
from spra_jax.sharding.mesh import _is_sharding, _mesh_of
from spra_jax.transform import SparseMaskedState, without_variables

__all__ = [
    "check_shard_local",
    "compact_sharding",
    "delta_shardings",
    "lean_state_shardings",
    "mask_shardings",
    "opt_state_shardings",
]


def _replicated_like(sharding: NamedSharding) -> NamedSharding:
  return NamedSharding(sharding.mesh, P())


def _compact_leaf_sharding(m: LeafMask, sharding: NamedSharding) -> NamedSharding | None:
  """The sharding of a leaf's compact values: the parameter's for a full leaf, compact for sparse."""
  if m.kind == FROZEN:
    return None
  if m.kind == FULL:
    return sharding
  if m.blocks is not None and m.blocks == block_grid(m.shape, sharding):
    return compact_sharding(sharding)
  # Not stratified for this sharding (or not split): the compact vector is replicated;
  # the step is still correct, but the optimizer's gathers then communicate.
  return _replicated_like(sharding)


def _check_structure(mask: Any, shardings: Any) -> None:
  mask_def = jax.tree.structure(mask, is_leaf=is_leaf_mask)
  if jax.tree.structure(shardings, is_leaf=_is_sharding) != mask_def:
    raise ValueError("param_shardings must have the structure of the parameters the mask was sampled on.")


def mask_shardings(mask: Any, param_shardings: Any) -> Any:
  """The mask tree with each sparse leaf's indices replaced by their ``NamedSharding``.

  Shard-local leaves whose grid matches their parameter's sharding get
  :func:`compact_sharding`; other sparse leaves' indices are replicated.

  Example:

    >>> from spra_jax.sharding import make_mesh
    >>> mesh = make_mesh()
    >>> mask = {'w': LeafMask.sparse((4, 4), jnp.array([1, 5], jnp.int32))}
    >>> mask_shardings(mask, {'w': NamedSharding(mesh, P())})['w'].indices.spec
    P()
  """
  _check_structure(mask, param_shardings)

  def one(m: LeafMask, s: NamedSharding):
    indices = _compact_leaf_sharding(m, s) if m.kind not in (FULL, FROZEN) else None
    return LeafMask(m.kind, m.shape, indices, m.blocks)

  return compact.map_leaves(one, mask, param_shardings)


def _values_shardings(mask: Any, param_shardings: Any) -> Any:
  return compact.map_leaves(_compact_leaf_sharding, mask, param_shardings)


def _present_shardings(mask: Any, param_shardings: Any, present: Any) -> Any:
  """Compact shardings where the compact tree ``present`` has an array, None where it has None (None if it is None)."""
  if present is None:
    return None
  return compact.map_leaves(lambda m, s, x: None if x is None else s, mask,
                            _values_shardings(mask, param_shardings), present)


def delta_shardings(delta: SparseDelta, param_shardings: Any) -> SparseDelta:
  """A ``SparseDelta`` of shardings for ``delta``: indices and values sharded alike.

  Example:

    >>> import spra_jax as spra
    >>> mesh = spra.sharding.make_mesh()
    >>> delta = spra.init_delta({'w': LeafMask.full((4, 4))})
    >>> delta_shardings(delta, {'w': NamedSharding(mesh, P(None, 'tensor'))}).values['w'].spec
    P(None, 'tensor')
  """
  if not isinstance(delta, SparseDelta):
    raise TypeError(f"delta_shardings expects a SparseDelta, got {type(delta).__name__}.")
  return SparseDelta(mask_shardings(delta.mask, param_shardings), _values_shardings(delta.mask, param_shardings))


def _suffix_finder(entries: list[tuple[str, tuple[int, ...], Any]]) -> Callable[[str, tuple[int, ...]], Any]:
  """For a state leaf's path and shape, the sharding of the entry whose path is its longest '/'-suffix."""
  by_path = {p: (shape, s) for p, shape, s in entries}

  def find(path: str, shape: tuple[int, ...]):
    parts = path.split("/")
    for start in range(len(parts)):
      hit = by_path.get("/".join(parts[start:]))
      if hit is not None and hit[0] == shape and hit[1] is not None:
        return hit[1]
    return None

  return find


def _map_state(state: Any, find: Callable, replicated: NamedSharding) -> Any:
  def one(path, leaf):
    found = find(path_str(path), tuple(np.shape(leaf)))
    return found if found is not None else replicated

  return jax.tree_util.tree_map_with_path(one, state)


def _compact_entries(mask: Any, param_shardings: Any) -> list[tuple[str, tuple[int, ...], Any]]:
  flat = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf_mask)[0]
  shardings = jax.tree.structure(mask, is_leaf=is_leaf_mask).flatten_up_to(_values_shardings(mask, param_shardings))
  out = []
  for (p, m), s in zip(flat, shardings):
    out.append((path_str(p), m.shape if m.kind == FULL else (m.num_trainable,), s))
  return out


def opt_state_shardings(opt_state: Any, param_shardings: Any, params: Any = None) -> Any:
  """``NamedSharding`` per leaf of an Optax state, ``spra.masked`` states included.

  Inside a :class:`spra.SparseMaskedState`, the mask gets :func:`mask_shardings`
  and each inner-state leaf whose path ends with a parameter's path and has
  that leaf's compact shape gets the compact sharding (AdamW's ``mu``/``nu``).
  Outside, leaves whose path ends with a parameter's path and that have its
  shape get the parameter's sharding (dense AdamW of full fine-tuning; give
  ``params`` for their shapes, or a ``spra.masked`` state in the tree gives
  them). Everything else (step counts, scalars) is replicated.

  Args:
    opt_state: the optimizer state (arrays or ``jax.ShapeDtypeStruct``).
    param_shardings: the parameters' shardings (:func:`param_shardings`).
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``), for their shapes.

  Example:

    >>> import optax
    >>> from spra_jax.sharding import make_mesh
    >>> mesh = make_mesh()
    >>> params = {'w': jnp.zeros((8, 4))}
    >>> shardings = {'w': NamedSharding(mesh, P(None, 'tensor'))}
    >>> state = optax.adam(1e-3).init(params)
    >>> out = opt_state_shardings(state, shardings, params)
    >>> out[0].mu['w'].spec, out[0].count.spec
    (P(None, 'tensor'), P())
  """
  # Shardings taken from an ``nnx.state`` tree carry Variables; the spra.masked state holds plain arrays.
  param_shardings, params = without_variables(param_shardings), without_variables(params)
  mesh = _mesh_of(param_shardings)
  replicated = NamedSharding(mesh, P())
  is_sms = lambda x: isinstance(x, SparseMaskedState)
  masked_states = [x for x in jax.tree.leaves(opt_state, is_leaf=is_sms) if is_sms(x)]
  if params is None and masked_states:
    params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, jnp.float32), masked_states[0].mask,
                          is_leaf=is_leaf_mask)
  entries = []
  if params is not None:
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(param_shardings, is_leaf=_is_sharding)
    if len(flat_p) != len(flat_s):
      raise ValueError(f"params has {len(flat_p)} leaves but param_shardings has {len(flat_s)}.")
    entries = [(path_str(p), tuple(np.shape(x)), s) for (p, x), s in zip(flat_p, flat_s)]
  find_param = _suffix_finder(entries)

  def one(path, sub):
    if is_sms(sub):
      _check_structure(sub.mask, param_shardings)
      inner = _map_state(sub.inner_state, _suffix_finder(_compact_entries(sub.mask, param_shardings)), replicated)
      return SparseMaskedState(mask_shardings(sub.mask, param_shardings), inner,
                               _present_shardings(sub.mask, param_shardings, sub.masters))
    found = find_param(path_str(path), tuple(np.shape(sub)))
    return found if found is not None else replicated

  return jax.tree_util.tree_map_with_path(one, opt_state, is_leaf=is_sms)


def lean_state_shardings(state: LeanState, param_shardings: Any) -> LeanState:
  """``NamedSharding`` per leaf of a :class:`spra.LeanState` (weights, delta, optimizer state, pending update).

  Example:

    >>> import optax, spra_jax as spra
    >>> mesh = spra.sharding.make_mesh()
    >>> params = {'w': jnp.ones((8, 4))}
    >>> step = spra.lean_step(lambda p: p['w'].sum(), optax.adam(1e-3), jit=False)
    >>> state = step.init(params, spra.sample_mask(0, params, density=0.5))
    >>> lean_state_shardings(state, {'w': NamedSharding(mesh, P())}).opt_state[0].mu['w'].spec
    P()
  """
  if not isinstance(state, LeanState):
    raise TypeError(f"lean_state_shardings expects a spra.LeanState, got {type(state).__name__}.")
  mesh = _mesh_of(param_shardings)
  replicated = NamedSharding(mesh, P())
  mask = state.delta.mask
  values = _values_shardings(mask, param_shardings)
  return LeanState(
      params=param_shardings,
      delta=delta_shardings(state.delta, param_shardings),
      opt_state=_map_state(state.opt_state, _suffix_finder(_compact_entries(mask, param_shardings)), replicated),
      pending=values,
      step=replicated,
      base=_present_shardings(mask, param_shardings, state.base),
  )


def check_shard_local(mask: Any, param_shardings: Any) -> None:
  """Raises ``ValueError`` unless every sparse leaf split by its sharding is shard-local to it.

  Checks that each such leaf's grid (``LeafMask.blocks``) is its sharding's
  block grid and that slice j of the (concrete) indices lies in block j, with
  the same count per block. Leaves that their sharding does not split pass.

  Example:

    >>> from spra_jax.sharding import make_mesh
    >>> mesh = make_mesh()
    >>> check_shard_local({'w': LeafMask.sparse((4,), jnp.array([0, 2], jnp.int32))}, {'w': NamedSharding(mesh, P())})
  """
  _check_structure(mask, param_shardings)
  flat = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf_mask)[0]
  shardings = jax.tree.leaves(param_shardings, is_leaf=_is_sharding)
  for (p, m), s in zip(flat, shardings):
    if m.kind != "sparse":
      continue
    grid = block_grid(m.shape, s)
    if grid is None:
      continue
    if m.blocks != grid:
      raise ValueError(
          f"mask leaf {path_str(p)!r} has blocks {m.blocks}, but its sharding {s.spec} splits it into {grid}; "
          "sample the mask on the sharded parameters (spra.sample_mask / spra.masked init)."
      )
    validate_indices(path_str(p), m, check_values=True)

