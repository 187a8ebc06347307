"""Values on the host, whichever processes hold them: the one place that knows about multi-process JAX.

On a multi-process cluster (``jax.distributed``) an array may span devices of other processes; ``np.asarray`` of it
fails. Functions here are *collective* when the cluster has more than one process: every process must call them, in
the same order (the normal case: every process runs the same program).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["all_agree", "barrier", "broadcast_from_primary", "gather_rows", "is_primary", "local_rows", "multiprocess",
           "process_rows", "replicated", "replicated_sharding", "to_host"]


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


def _union(spans: list[tuple[int, int]], what: str) -> slice:
  spans = sorted(set(spans))
  lo, hi = spans[0][0], spans[0][0]
  for a, b in spans:
    if a > hi:
      raise ValueError(f"{what}: this process holds rows {spans}, which are not one contiguous range; lay the "
                       "batch axes out so that each process's devices hold consecutive rows (jax.devices() order).")
    hi = max(hi, b)
  return slice(lo, hi)


def process_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> slice:
  """The rows (first dimension) of a global array of ``shape`` laid out by ``sharding`` that this process's devices hold.

  What a process must feed ``jax.make_array_from_process_local_data`` for that array: ``slice(0, shape[0])`` on one
  process, or where the rows are replicated over processes.

  Raises:
    ValueError: this process's rows are not one contiguous range.

  Example:

    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.sharding.Mesh(jax.devices(), ('data',))
    >>> process_rows(NamedSharding(mesh, P('data')), (16, 40))  # one process holds every row
    slice(0, 16, None)
  """
  shape = tuple(int(d) for d in shape)
  spans = []
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows = index[0] if index else slice(None)
    spans.append((rows.start or 0, shape[0] if rows.stop is None else rows.stop))
  return _union(spans, "process_rows")


def local_rows(x: Any) -> tuple[slice, np.ndarray]:
  """``(rows, values)``: the rows of ``x`` this process holds and their values (all of them for a local array)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    host = np.asarray(jax.device_get(x))
    return slice(0, host.shape[0]), host
  pieces: dict[tuple[int, int], Any] = {}
  for shard in x.addressable_shards:
    rows = shard.index[0] if shard.index else slice(None)
    span = (rows.start or 0, x.shape[0] if rows.stop is None else rows.stop)
    if span not in pieces:
      pieces[span] = shard
  rows = _union(list(pieces), "local_rows")
  covered, parts = rows.start, []
  for (a, b), shard in sorted(pieces.items()):
    if b > covered:  # (a piece that overlaps the last one adds only its new rows)
      parts.append(np.asarray(shard.data)[covered - a:])
      covered = b
  return rows, np.concatenate(parts) if len(parts) > 1 else parts[0]


def gather_rows(local: np.ndarray, rows: slice, total: int) -> np.ndarray:
  """The ``[total, ...]`` array whose rows ``rows`` are ``local``, each process giving its own rows (collective).

  Per-row results (predictions, per-row losses) computed by each process on the rows it holds, assembled on every
  process in row order; rows held by several processes (replicated) come from any of them.
  """
  local = np.asarray(local)
  if not multiprocess():
    if (rows.start, rows.stop) != (0, total) or local.shape[0] != total:
      raise ValueError(f"gather_rows on one process needs all {total} rows, got rows {rows.start}:{rows.stop}.")
    return local
  from jax.experimental import multihost_utils

  padded = np.zeros((total, *local.shape[1:]), local.dtype)
  padded[: local.shape[0]] = local
  spans = np.asarray(multihost_utils.process_allgather(np.asarray([rows.start, rows.stop], np.int64)))
  everyone = np.asarray(multihost_utils.process_allgather(padded))
  out = np.zeros_like(padded)
  seen = np.zeros(total, bool)
  for (a, b), values in zip(spans.reshape(-1, 2).tolist(), everyone.reshape(-1, *padded.shape)):
    out[a:b] = values[: b - a]
    seen[a:b] = True
  if not seen.all():
    raise ValueError(f"gather_rows: rows {np.flatnonzero(~seen)[:8].tolist()} of {total} are held by no process.")
  return out
