"""Shard-local layout: the grid of equal blocks a sharding cuts a leaf into, and the sharding of the compact vector.

:func:`~spra_jax.masks.sample_mask` gives every block of a sharded leaf the same number of entries
(:func:`block_budget`), so that the leaf's compact ``[k]`` vector splits into equal slices, slice j on the devices
that hold block j (:func:`compact_sharding`); see :class:`~spra_jax.masks.LeafMask` for the order of its indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spra_jax import _host
from spra_jax.masks._allocation import _round_half_up
from spra_jax.masks.leaf import SPARSE, LeafMask, _check_blocks

__all__ = ["block_budget", "block_grid", "block_counts", "compact_sharding", "leaf_sharding", "relayout_leaf"]


def block_grid(shape: Sequence[int], sharding: Any) -> tuple[int, ...] | None:
  """The shard grid a ``jax.sharding.Sharding`` cuts a leaf of ``shape`` into.

  Returns the number of blocks per dimension, or None when the leaf is not
  split (one device, or replicated) or is split unevenly (padded shards).

  Example:

    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ('tensor',))
    >>> block_grid((64, 32), NamedSharding(mesh, P(None, 'tensor'))) is None  # one device: no split
    True
  """
  shape = tuple(int(d) for d in shape)
  if sharding is None or not hasattr(sharding, "shard_shape"):
    return None
  local = tuple(int(d) for d in sharding.shard_shape(shape))
  if any(ls == 0 or s % ls for s, ls in zip(shape, local)):
    return None
  return _check_blocks(shape, tuple(s // ls for s, ls in zip(shape, local)))


def leaf_sharding(leaf: Any) -> Any:
  """The sharding a (concrete or abstract) leaf carries, or None (tracers, numpy arrays)."""
  if isinstance(leaf, jax.core.Tracer):
    return None
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf.sharding
  if isinstance(leaf, jax.Array):
    try:
      return leaf.sharding
    except Exception:  # noqa: BLE001 - deleted or otherwise unreadable arrays carry no usable sharding.
      return None
  return None


def compact_sharding(sharding: Any) -> Any:
  """The sharding of a shard-local compact vector for a leaf with ``sharding``.

  For a ``NamedSharding`` with spec ``P(a, (b, c))`` the compact ``[k]``
  vector is sharded ``P((a, b, c))``: its j-th slice lives on the devices that
  hold block j of the leaf (blocks numbered row-major), and it is replicated
  over the mesh axes the leaf is replicated over. Other shardings give None.

  Example:

    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ('tensor',))
    >>> compact_sharding(NamedSharding(mesh, P(None, 'tensor'))).spec
    P('tensor',)
  """
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  axes: list[str] = []
  for entry in sharding.spec:
    if entry is None:
      continue
    axes.extend(entry if isinstance(entry, tuple) else (entry,))
  spec = jax.sharding.PartitionSpec(tuple(axes)) if axes else jax.sharding.PartitionSpec()
  return jax.sharding.NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)


def block_budget(budget: int, num_blocks: int, block_size: int) -> int:
  """Entries per block for a shard-local leaf: ``budget / num_blocks`` rounded half up.

  At least one per block when ``budget > 0``, at most ``block_size``.

  Example:

    >>> block_budget(100, 8, 1000), block_budget(3, 8, 1000), block_budget(0, 8, 1000)
    (13, 1, 0)
  """
  if budget <= 0:
    return 0
  return min(block_size, max(1, _round_half_up(budget / num_blocks)))


def _block_of(flat: np.ndarray, shape: tuple[int, ...], blocks: tuple[int, ...] | None) -> np.ndarray:
  """The row-major number of the block of ``blocks`` that holds each flat position (all 0 for one block)."""
  if blocks is None:
    return np.zeros(flat.shape, np.int64)
  coords = np.unravel_index(flat, shape)
  return np.ravel_multi_index(tuple(c // (s // b) for c, s, b in zip(coords, shape, blocks)), blocks)


def block_counts(m: LeafMask, blocks: Sequence[int] | None) -> np.ndarray:
  """How many of a sparse leaf's entries fall in each block of the grid ``blocks`` (row-major; one count for None).

  Collective on a multi-process cluster when the indices span other processes' devices (every process calls it).

  Example:

    >>> import jax.numpy as jnp
    >>> m = LeafMask.sparse((4, 4), jnp.array([0, 1, 4, 5, 10, 15], jnp.int32))
    >>> block_counts(m, (2, 1)).tolist(), block_counts(m, (1, 2)).tolist()
    ([4, 2], [4, 2])
  """
  if m.kind != SPARSE:
    raise ValueError(f"block_counts needs a sparse LeafMask, got a {m.kind} one.")
  grid = _check_blocks(m.shape, blocks)
  flat = _host.to_host(m.indices).astype(np.int64)
  num = int(np.prod(grid)) if grid is not None else 1
  return np.bincount(_block_of(flat, m.shape, grid), minlength=num)


def relayout_leaf(m: LeafMask, blocks: Sequence[int] | None) -> tuple[LeafMask, np.ndarray]:
  """The same entries of a sparse leaf, laid out for the shard grid ``blocks``, and the permutation that does it.

  Returns ``(new, perm)`` with ``new.blocks == blocks`` (normalised: an all-ones grid is None) and
  ``new.indices == m.indices[perm]``: apply ``x[perm]`` to every compact ``[k]`` vector that follows the mask
  (delta values, optimizer moments, masters) and they stay aligned with it. The new indices are block-major for
  ``blocks`` and sorted within each block (globally sorted for None), as :class:`LeafMask` requires. ``new.indices``
  is a host-side int32 array on the default device; place it where the state needs it.

  A layout for ``blocks`` exists only when every block of that grid holds the same number of the leaf's entries
  (the compact vector splits into equal slices). That always holds for a grid each of whose blocks is a union of
  the mask's own blocks (``m.blocks[d]`` a multiple of ``blocks[d]`` in every dimension, e.g. 8 row blocks onto 4
  or 2, or onto one), since sampling put the same count in each of those. Collective on a multi-process cluster
  when the indices span other processes' devices.

  Raises:
    ValueError: ``m`` is not sparse, ``blocks`` does not fit its shape, or the blocks of ``blocks`` would hold
      different numbers of entries (the message gives the spread); the mask is not changed.

  Example:

    >>> import jax.numpy as jnp
    >>> m = LeafMask.sparse((4, 4), jnp.array([0, 6, 9, 15], jnp.int32), blocks=(2, 1))
    >>> new, perm = relayout_leaf(m, (1, 2))
    >>> new, new.indices.tolist(), perm.tolist()
    (LeafMask.sparse(shape=(4, 4), k=4, blocks=(1, 2)), [0, 9, 6, 15], [0, 2, 1, 3])
  """
  counts = block_counts(m, blocks)
  grid = _check_blocks(m.shape, blocks)
  if counts.size and counts.min() != counts.max():
    raise ValueError(
        f"the mask leaf of shape {m.shape} with blocks {m.blocks} cannot be laid out for the grid {grid}: its "
        f"{m.num_trainable} entries fall {counts.min()} to {counts.max()} per block of that grid, and a shard-local "
        "layout needs the same number in every block. A grid whose blocks are unions of the mask's own blocks "
        f"always works (e.g. any grid dividing {m.blocks})."
    )
  flat = _host.to_host(m.indices).astype(np.int64)
  perm = np.lexsort((flat, _block_of(flat, m.shape, grid))).astype(np.int32)
  return LeafMask.sparse(m.shape, jnp.asarray(flat[perm], jnp.int32), blocks=grid), perm
