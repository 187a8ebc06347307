"""Device meshes with the ``(data, fsdp, tensor)`` axes, and how batches are split over them.

Example:

  >>> from spra_jax.sharding import make_mesh, batch_sharding
  >>> batch_sharding(make_mesh(), 3).spec
  P(('data', 'fsdp'), None, None)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["AXES", "batch_sharding", "make_mesh"]

AXES = ("data", "fsdp", "tensor")


def make_mesh(*, data: int | None = None, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all of them).

  ``data`` defaults to the devices left over by ``fsdp * tensor``. The axes are
  ``AxisType.Auto`` (classic GSPMD: shardings propagate through ``jax.jit``).
  Devices are laid out by ``jax.make_mesh``'s rules (the fastest links on the
  innermost, ``tensor`` axis) when all devices are used, in the given order otherwise.

  Args:
    data: devices along the batch axis.
    fsdp: devices along the fully sharded axis (batch, and one dimension of each matrix).
    tensor: devices along the tensor-parallel axis.
    devices: the devices to use; ``data * fsdp * tensor`` of them.

  Raises:
    ValueError: if the sizes do not multiply to the number of devices.

  Example:

    >>> mesh = make_mesh()
    >>> mesh.axis_names, mesh.shape['data'] == len(jax.devices())
    (('data', 'fsdp', 'tensor'), True)
  """
  devices = list(jax.devices() if devices is None else devices)
  for name, size in (("fsdp", fsdp), ("tensor", tensor)):
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"{name} must be a positive int, got {size!r}.")
  if data is None:
    if len(devices) % (fsdp * tensor):
      raise ValueError(f"fsdp * tensor = {fsdp * tensor} does not divide the {len(devices)} devices.")
    data = len(devices) // (fsdp * tensor)
  if data * fsdp * tensor != len(devices):
    raise ValueError(
        f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, "
        f"but {len(devices)} were given."
    )
  shape = (data, fsdp, tensor)
  if len(devices) == len(jax.devices()) and set(devices) == set(jax.devices()):
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays split along their first dimension over ``data`` and ``fsdp``.

  Example:

    >>> batch_sharding(make_mesh(), 2).spec
    P(('data', 'fsdp'), None)
  """
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def _is_sharding(x: Any) -> bool:
  return isinstance(x, NamedSharding)


def _mesh_of(param_shardings: Any) -> Mesh:
  """The mesh of a pytree of ``NamedSharding`` (the state and step builders take the parameters' shardings)."""
  leaves = jax.tree.leaves(param_shardings, is_leaf=_is_sharding)
  if not leaves or not all(isinstance(s, NamedSharding) for s in leaves):
    raise TypeError("param_shardings must be a non-empty pytree of NamedSharding (see spra.sharding.param_shardings).")
  return leaves[0].mesh
