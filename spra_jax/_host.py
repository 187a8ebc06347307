"""Values on the host, whichever processes hold them: the one place that knows about multi-process JAX.

On a multi-process cluster (``jax.distributed``) an array may span devices of other processes; ``np.asarray`` of it
fails. Functions here are *collective* when the cluster has more than one process: every process must call them, in
the same order (the normal case: every process runs the same program).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["all_agree", "barrier", "broadcast_from_primary", "is_primary", "multiprocess", "replicated",
           "replicated_sharding", "to_host"]


def multiprocess() -> bool:
  """Whether this program runs on more than one JAX process."""
  return jax.process_count() > 1


def is_primary() -> bool:
  """Whether this is the process that writes shared files (process 0)."""
  return jax.process_index() == 0


def to_host(x: Any) -> np.ndarray:
  """``x`` as a numpy array: gathered from every process if it spans other processes' devices (collective then)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def replicated_sharding() -> jax.sharding.NamedSharding:
  """A sharding that puts a whole copy on every device of every process."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def replicated(x: Any) -> Any:
  """On several processes, host-local ``x`` (the same value on every process) as a global, replicated array.

  What a multi-process save needs of a small host-local value such as a PRNG key's data; ``x`` itself on one
  process or when it is already global.
  """
  if not multiprocess() or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return x
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, replicated_sharding(), lambda index: host[index])


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier of this name (nothing on one process)."""
  if multiprocess():
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def broadcast_from_primary(value: Any) -> Any:
  """Process 0's ``value`` (a small numpy-able array or scalar) on every process (itself on one process)."""
  if not multiprocess():
    return value
  from jax.experimental import multihost_utils

  return multihost_utils.broadcast_one_to_all(np.asarray(value))


def all_agree(flag: bool) -> bool:
  """True on every process when ``flag`` is True on every process (``flag`` itself on one process)."""
  if not multiprocess():
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
