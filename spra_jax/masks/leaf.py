"""The mask format: :class:`LeafMask`, its kinds, leaf paths, validation and the dense form.

Every other module of :mod:`spra_jax.masks` builds on this one: a mask is a pytree with the structure of the
parameters whose leaves are :class:`LeafMask` nodes, a leaf is named by its '/'-joined path (:func:`path_str`),
:func:`validate` checks that a mask fits its parameters, and :func:`from_dense`/:func:`to_dense` convert a mask from
and to boolean arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spra_jax import _host

__all__ = [
    "FROZEN",
    "FULL",
    "SPARSE",
    "LeafMask",
    "from_dense",
    "is_leaf_mask",
    "path_str",
    "to_dense",
    "validate",
    "validate_indices",
]


FROZEN = "frozen"
FULL = "full"
SPARSE = "sparse"
_KINDS = (FROZEN, FULL, SPARSE)

# Flat positions are int32: a leaf may hold at most this many entries.
_MAX_LEAF_SIZE = np.iinfo(np.int32).max


@jax.tree_util.register_pytree_node_class
class LeafMask:
  """Which entries of one parameter leaf are trainable.

  Build one with :meth:`frozen`, :meth:`full` or :meth:`sparse`. ``kind``,
  ``shape`` and ``blocks`` are static metadata; ``indices`` (sparse leaves only)
  is the single array child, so a pytree of ``LeafMask`` flattens to its index
  vectors.

  ``blocks`` (sparse leaves only) is the shard grid of a *shard-local* mask:
  the number of equal blocks along each dimension of the leaf, as a sharding
  splits it (``(1, 8)`` for a kernel whose columns are split over 8 devices).
  The indices are then block-major: ``indices`` is ``num_blocks`` equal slices,
  slice j holds entries of block j only (blocks numbered row-major over the
  grid), sorted within the slice. When the blocks are contiguous ranges of the
  flat leaf (only the leading dimension split) this is the usual globally
  sorted order; otherwise the indices are unique but sorted only per slice.
  ``None`` (the default) means one block: sorted, unique indices.

  Example:

    >>> import jax.numpy as jnp
    >>> m = LeafMask.sparse((4, 4), jnp.array([1, 5, 14], jnp.int32))
    >>> m.num_trainable, m.size
    (3, 16)
    >>> LeafMask.sparse((4, 4), jnp.array([0, 4, 2, 7], jnp.int32), blocks=(1, 2))
    LeafMask.sparse(shape=(4, 4), k=4, blocks=(1, 2))
  """

  __slots__ = ("blocks", "indices", "kind", "shape")

  def __init__(self, kind: str, shape: Sequence[int], indices: Any = None, blocks: Sequence[int] | None = None):
    if kind not in _KINDS:
      raise ValueError(f"LeafMask kind must be one of {_KINDS}, got {kind!r}.")
    self.kind = kind
    self.shape = tuple(int(d) for d in shape)
    self.indices = indices
    self.blocks = _check_blocks(self.shape, blocks) if kind == SPARSE else None

  @classmethod
  def frozen(cls, shape: Sequence[int]) -> LeafMask:
    """A leaf none of whose entries train."""
    return cls(FROZEN, shape)

  @classmethod
  def full(cls, shape: Sequence[int]) -> LeafMask:
    """A leaf all of whose entries train."""
    return cls(FULL, shape)

  @classmethod
  def sparse(cls, shape: Sequence[int], indices: Any, *, blocks: Sequence[int] | None = None) -> LeafMask:
    """A leaf whose entries at the flat ``indices`` train (``blocks``: see the class)."""
    return cls(SPARSE, shape, indices, blocks)

  @property
  def size(self) -> int:
    """Number of entries of the leaf."""
    return math.prod(self.shape)

  @property
  def num_trainable(self) -> int:
    """Number of trainable entries (static: it is the indices' length)."""
    if self.kind == FULL:
      return self.size
    if self.kind == SPARSE:
      return int(np.shape(self.indices)[0])
    return 0

  @property
  def density(self) -> float:
    """Fraction of the leaf's entries that train."""
    return self.num_trainable / self.size if self.size else 0.0

  @property
  def num_blocks(self) -> int:
    """Number of shard blocks the indices are stratified over (1 if not shard-local)."""
    return math.prod(self.blocks) if self.blocks is not None else 1

  @property
  def indices_sorted(self) -> bool:
    """True when the indices are sorted over the whole leaf (always, unless shard-local).

    Shard-local indices are globally sorted when each block is a contiguous
    range of the flat leaf: at most one dimension is split and every dimension
    before it has size 1.
    """
    if self.blocks is None:
      return True
    split = [d for d, b in enumerate(self.blocks) if b > 1]
    return len(split) == 1 and math.prod(self.shape[: split[0]]) == 1

  def tree_flatten(self):
    children = (self.indices,) if self.kind == SPARSE else ()
    return children, (self.kind, self.shape, self.blocks)

  @classmethod
  def tree_unflatten(cls, aux, children):
    kind, shape, blocks = aux
    obj = object.__new__(cls)
    obj.kind, obj.shape, obj.blocks = kind, shape, blocks
    obj.indices = children[0] if kind == SPARSE else None
    return obj

  def __repr__(self) -> str:
    if self.kind == SPARSE:
      blocks = "" if self.blocks is None else f", blocks={self.blocks}"
      return f"LeafMask.sparse(shape={self.shape}, k={self.num_trainable}{blocks})"
    return f"LeafMask.{self.kind}(shape={self.shape})"


def _check_blocks(shape: tuple[int, ...], blocks: Sequence[int] | None) -> tuple[int, ...] | None:
  """Validates a shard grid for ``shape``; an all-ones grid is normalised to None."""
  if blocks is None:
    return None
  blocks = tuple(int(b) for b in blocks)
  if len(blocks) != len(shape) or any(b < 1 or s % b for s, b in zip(shape, blocks)):
    raise ValueError(
        f"blocks must give, per dimension, a number of equal blocks that divides the size; "
        f"got blocks={blocks} for shape {shape}."
    )
  return None if all(b == 1 for b in blocks) else blocks


def is_leaf_mask(x: Any) -> bool:
  """True for a :class:`LeafMask` (use as ``is_leaf`` in tree functions)."""
  return isinstance(x, LeafMask)


def _key_name(k: Any) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path: Sequence[Any]) -> str:
  """Joins a JAX key path with ``/``, e.g. ``layers/3/attn/v_proj/kernel``.

  The trailing ``value`` attribute of Flax NNX variables is dropped, so the
  state of an NNX module and its plain-dict form give the same paths.

  Example:

    >>> import jax
    >>> [(p, _)] = jax.tree_util.tree_flatten_with_path({'a': [0, 1]})[0][1:]
    >>> path_str(p)
    'a/1'
  """
  names = [_key_name(k) for k in path]
  if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names = names[:-1]
  return "/".join(names)


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None:
    arr = np.asarray(leaf)
    shape, dtype = arr.shape, arr.dtype
  return tuple(int(d) for d in shape), np.dtype(dtype)


def _is_trainable_dtype(dtype: np.dtype) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.floating))


def _example_paths(paths: Sequence[str], limit: int = 6) -> str:
  shown = ", ".join(repr(p) for p in paths[:limit])
  return shown + (f", … ({len(paths)} leaves)" if len(paths) > limit else "")


def _leaf_masks_with_paths(mask: Any) -> list[tuple[str, LeafMask]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=is_leaf_mask)
  out = []
  for p, m in flat:
    if not isinstance(m, LeafMask):
      raise TypeError(f"mask leaf at {path_str(p)!r} is a {type(m).__name__}, expected a LeafMask.")
    out.append((path_str(p), m))
  return out


def validate(mask: Any, params: Any, *, check_indices: bool = True) -> None:
  """Checks that ``mask`` fits ``params``; raises ``ValueError`` naming the leaf.

  Checks the tree structure, each leaf's shape, and (for concrete sparse
  indices, when ``check_indices``) that indices are int32, 1-D, sorted, unique
  and in range.

  Example:

    >>> import jax.numpy as jnp
    >>> validate({'w': LeafMask.full((2, 3))}, {'w': jnp.zeros((3, 2))})
    Traceback (most recent call last):
    ...
    ValueError: mask leaf 'w' has shape (2, 3) but the parameter has shape (3, 2).
  """
  mask_flat = _leaf_masks_with_paths(mask)
  params_flat, params_def = jax.tree_util.tree_flatten_with_path(params)
  mask_def = jax.tree.structure(mask, is_leaf=is_leaf_mask)
  if mask_def != params_def:
    mask_paths = {p for p, _ in mask_flat}
    param_paths = {path_str(p) for p, _ in params_flat}
    missing = sorted(param_paths - mask_paths)
    extra = sorted(mask_paths - param_paths)
    detail = []
    if missing:
      detail.append(f"parameters without a mask leaf: {_example_paths(missing)}")
    if extra:
      detail.append(f"mask leaves without a parameter: {_example_paths(extra)}")
    if not detail:
      detail.append(f"the containers differ: mask {mask_def} vs params {params_def}")
    raise ValueError("mask does not match the parameter tree; " + "; ".join(detail) + ".")
  for (path, m), (_, leaf) in zip(mask_flat, params_flat):
    shape, dtype = _shape_dtype(leaf)
    if m.shape != shape:
      raise ValueError(f"mask leaf {path!r} has shape {m.shape} but the parameter has shape {shape}.")
    if m.kind != FROZEN and not _is_trainable_dtype(dtype):
      raise ValueError(f"mask leaf {path!r} is {m.kind} but the parameter has non-floating dtype {dtype}.")
    if m.kind == SPARSE:
      validate_indices(path, m, check_values=check_indices)


def validate_indices(path: str, m: LeafMask, *, check_values: bool) -> None:
  """Checks the indices of one sparse leaf mask; raises ``ValueError`` naming the leaf.

  The indices must be a 1-D int32 vector. With ``check_values``, concrete indices (tracers and
  ``jax.ShapeDtypeStruct`` have no values to read) must also lie in ``[0, size)`` and be sorted and unique; for a
  shard-local mask (``m.blocks`` set) they must split into ``m.num_blocks`` equal slices, slice j sorted, unique
  and inside shard block j. :func:`validate` runs this on every sparse leaf of a mask.

  Args:
    path: the leaf's '/'-joined path, for the message.
    m: a sparse :class:`LeafMask`.
    check_values: check the values too, not only the shape and dtype.

  Raises:
    ValueError: the indices break one of these rules.

  Example:

    >>> import jax.numpy as jnp
    >>> validate_indices('w', LeafMask.sparse((4,), jnp.array([2, 1], jnp.int32)), check_values=True)
    Traceback (most recent call last):
    ...
    ValueError: mask leaf 'w': indices must be sorted and unique.
  """
  idx = m.indices
  ishape, idtype = _shape_dtype(idx)
  if len(ishape) != 1 or idtype != np.int32:
    raise ValueError(f"mask leaf {path!r}: indices must be a 1-D int32 vector, got {idtype}{list(ishape)}.")
  if not check_values or isinstance(idx, (jax.core.Tracer, jax.ShapeDtypeStruct)) or ishape[0] == 0:
    return
  if isinstance(idx, jax.Array) and not idx.is_fully_addressable:
    _validate_global_indices(path, m)
    return
  _check_index_values(path, m, np.asarray(idx), 0, ishape[0])


def _check_index_values(path: str, m: LeafMask, values: np.ndarray, start: int, total: int) -> None:
  """The rules of :func:`validate_indices` on ``values`` = ``indices[start:start + len(values)]`` of ``total``."""
  if values.size == 0:
    return
  if values.min() < 0 or values.max() >= m.size:
    raise ValueError(f"mask leaf {path!r}: indices must lie in [0, {m.size}), got [{values.min()}, {values.max()}].")
  if m.blocks is None:
    if np.any(np.diff(values) <= 0):
      raise ValueError(f"mask leaf {path!r}: indices must be sorted and unique.")
    return
  if total % m.num_blocks:
    raise ValueError(
        f"mask leaf {path!r}: {total} indices cannot split into {m.num_blocks} equal slices (blocks {m.blocks})."
    )
  slice_of = (start + np.arange(values.size)) // (total // m.num_blocks)
  if np.any((np.diff(values) <= 0) & (np.diff(slice_of) == 0)):
    raise ValueError(f"mask leaf {path!r}: indices must be sorted and unique within each of the {m.num_blocks} slices.")
  coords = np.unravel_index(values, m.shape)
  block_of = np.ravel_multi_index(tuple(c // (s // b) for c, s, b in zip(coords, m.shape, m.blocks)), m.blocks)
  if np.any(block_of != slice_of):
    raise ValueError(
        f"mask leaf {path!r}: slice j of the indices must lie in shard block j of the grid {m.blocks} "
        "(blocks numbered row-major)."
    )


def _validate_global_indices(path: str, m: LeafMask) -> None:
  """:func:`validate_indices` for indices spanning other processes' devices: each process checks the shards it holds.

  Collective (every process validates the same mask). The pieces' boundaries are exchanged so that the order across
  shards held by different processes is checked too, and every process raises when any process found a violation.
  """
  idx = m.indices
  total = int(idx.shape[0])
  pieces = {}
  for shard in idx.addressable_shards:
    start = shard.index[0].start or 0
    pieces.setdefault(start, shard.data)
  error = None
  bounds = np.full((jax.local_device_count(), 3), -1, np.int64)  # (start, first, last) per local piece
  for row, (start, data) in enumerate(sorted(pieces.items())):
    values = np.asarray(data)
    if error is None:
      try:
        _check_index_values(path, m, values, start, total)
      except ValueError as e:
        error = str(e)
    if values.size and row < bounds.shape[0]:
      bounds[row] = (start, values[0], values[-1])
  if error is None:
    from jax.experimental import multihost_utils

    everyone = np.asarray(multihost_utils.process_allgather(bounds)).reshape(-1, 3)
    starts = {}
    for start, first, last in everyone[everyone[:, 0] >= 0].tolist():
      starts.setdefault(start, (first, last))
    ordered = sorted(starts.items())
    per = total // m.num_blocks if m.blocks is not None else total
    for (start_a, (_, last_a)), (start_b, (first_b, _)) in zip(ordered, ordered[1:]):
      same_slice = (start_b - 1) // per == start_b // per
      if same_slice and last_a >= first_b:
        error = (f"mask leaf {path!r}: indices must be sorted and unique"
                 + ("." if m.blocks is None else f" within each of the {m.num_blocks} slices."))
        break
  if not _host.all_agree(error is None):
    raise ValueError(error or f"mask leaf {path!r}: another process found invalid indices in the shards it holds.")


def from_dense(bool_tree: Any) -> Any:
  """Builds a mask from a pytree of boolean arrays (True = trainable).

  All-False leaves become frozen and all-True leaves full. This is the way in
  for masks chosen by any other rule (magnitudes, saliency scores, ...).

  Example:

    >>> import numpy as np
    >>> m = from_dense({'w': np.array([[True, False], [False, True]])})
    >>> m['w'], m['w'].indices.tolist()
    (LeafMask.sparse(shape=(2, 2), k=2), [0, 3])
  """

  def one(leaf):
    arr = np.asarray(leaf)
    if arr.dtype != np.bool_:
      raise TypeError(f"from_dense expects boolean arrays, got {arr.dtype}.")
    if not arr.any():
      return LeafMask.frozen(arr.shape)
    if arr.all():
      return LeafMask.full(arr.shape)
    return LeafMask.sparse(arr.shape, jnp.asarray(np.flatnonzero(arr.reshape(-1)), jnp.int32))

  return jax.tree.map(one, bool_tree)


def to_dense(mask: Any) -> Any:
  """The boolean array form of a mask (True = trainable), one array per leaf.

  Example:

    >>> to_dense({'w': LeafMask.sparse((2, 2), jnp.array([1], jnp.int32))})['w'].tolist()
    [[False, True], [False, False]]
  """

  def one(m: LeafMask):
    if m.kind == FULL:
      return jnp.ones(m.shape, bool)
    if m.kind == FROZEN:
      return jnp.zeros(m.shape, bool)
    return jnp.zeros((m.size,), bool).at[m.indices].set(True).reshape(m.shape)

  return jax.tree.map(one, mask, is_leaf=is_leaf_mask)
