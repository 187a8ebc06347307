"""Shard-local layout: the grid of equal blocks a sharding cuts a leaf into, and the sharding of the compact vector.

:func:`~spra_jax.masks.sample_mask` gives every block of a sharded leaf the same number of entries
(:func:`block_budget`), so that the leaf's compact ``[k]`` vector splits into equal slices, slice j on the devices
that hold block j (:func:`compact_sharding`); see :class:`~spra_jax.masks.LeafMask` for the order of its indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from spra_jax.masks._allocation import _round_half_up
from spra_jax.masks.leaf import _check_blocks

__all__ = ["block_budget", "block_grid", "compact_sharding", "leaf_sharding"]


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
